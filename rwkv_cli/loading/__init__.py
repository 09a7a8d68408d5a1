"""Loading a model, one step a module, in the order a load runs:

1. :mod:`~rwkv_cli.loading.spec`: what a model spec (``-m SPEC``) names: a local file, a Hub
   file or repo, an alias, or the demo model;
2. :mod:`~rwkv_cli.loading.hub` and :mod:`~rwkv_cli.loading.download`: that spec as a local file,
   found in or downloaded into the Hugging Face cache, with its :class:`Provenance`;
3. :mod:`~rwkv_cli.loading.checkpoint`: the file's tensors and the RWKV generation they hold;
4. :mod:`~rwkv_cli.loading.converted`: those tensors converted once and cached, then
   memory-mapped (the embedding rows read on demand, :mod:`~rwkv_cli.loading.filerows`);
5. :mod:`~rwkv_cli.loading.open`: the model on its device with its tokenizer (a
   :class:`~rwkv_cli.loading.loaded.LoadedModel`), and a saved state to continue from
   (``open_model``, ``open_start``).

Nothing is imported here: the model registry reads checkpoints through this package, and the
last step imports the registry.
"""
