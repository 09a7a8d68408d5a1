"""The state commands end to end: generate --state/--save-state, save-state, load-state."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest

from rwkv_cli.generation import prefill, stream_generate
from rwkv_cli.loading.open import open_model
from rwkv_cli.sampling import SamplingParams, make_generator
from rwkv_cli.statefile import read_state_file
from tests.support.cli_runner import SLOW_MACHINE_TIMEOUT_S, assert_one_line_error, rwkv, rwkv_ok
from tests.support.fixtures import flip_tensor_bytes

GREEDY = ["--temperature", "0"]


@pytest.fixture(scope="module")
def loaded(rwkv7_pth):
    return open_model(str(rwkv7_pth))


def _uninterrupted(
    loaded, turns: list[str], params: SamplingParams, seed: int, n: int
) -> list[str]:
    """Each turn's completion when one process runs all turns on one session and sampler."""
    generator, session, outputs = make_generator(seed)[0], None, []
    for text in turns:
        chunks = list(
            stream_generate(
                loaded.model,
                loaded.tokenizer,
                text,
                params=params,
                generator=generator,
                max_tokens=n,
                session=session,
            )
        )
        outputs.append("".join(chunk.text for chunk in chunks))
        session = chunks[-1].session
    return outputs


def test_save_then_resume_equals_one_uninterrupted_run(tmp_path, rwkv7_pth, loaded) -> None:
    state = tmp_path / "s.rwkvstate"
    first = rwkv("generate", "Tell me", "-m", rwkv7_pth, "-n", "10", *GREEDY, "--save-state", state)
    second = rwkv("generate", " more", "--state", state, "-n", "10")  # greedy comes from the file
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    expected = _uninterrupted(loaded, ["Tell me", " more"], SamplingParams(temperature=0), 0, 10)
    assert [first.stdout.decode(), second.stdout.decode()] == expected


def test_seeded_sampling_continues_from_the_saved_generator(tmp_path, rwkv7_pth, loaded) -> None:
    state = tmp_path / "s.rwkvstate"
    sampling = ["--temperature", "1.2", "--top-p", "0.95", "--presence-penalty", "0.4"]
    first = rwkv(
        "generate",
        "A",
        "-m",
        rwkv7_pth,
        "-n",
        "12",
        *sampling,
        "--seed",
        "9",
        "--save-state",
        state,
    )
    second = rwkv("generate", "B", "--state", state, "-n", "12")
    assert first.returncode == second.returncode == 0
    params = SamplingParams(temperature=1.2, top_p=0.95, presence_penalty=0.4)
    assert [first.stdout.decode(), second.stdout.decode()] == _uninterrupted(
        loaded, ["A", "B"], params, 9, 12
    )
    assert read_state_file(state).seed == 9


def test_the_same_file_can_be_read_and_replaced(tmp_path, rwkv7_pth, loaded) -> None:
    state = tmp_path / "s.rwkvstate"
    outputs = [
        rwkv("generate", "One", "-m", rwkv7_pth, "-n", "6", *GREEDY, "--save-state", state),
        rwkv("generate", " two", "--state", state, "--save-state", state, "-n", "6"),
        rwkv("generate", " three", "--state", state, "--save-state", state, "-n", "6"),
    ]
    assert all(result.returncode == 0 for result in outputs)
    expected = _uninterrupted(
        loaded, ["One", " two", " three"], SamplingParams(temperature=0), 0, 6
    )
    assert [result.stdout.decode() for result in outputs] == expected
    saved = read_state_file(state)
    assert saved.text_tail == "One" + expected[0] + " two" + expected[1] + " three" + expected[2]
    assert [p.name for p in tmp_path.iterdir()] == ["s.rwkvstate"]


def test_generate_with_a_state_and_no_prompt_continues_directly(
    tmp_path, rwkv7_pth, loaded
) -> None:
    state = tmp_path / "s.rwkvstate"
    rwkv_ok("save-state", "Prefix text", "-m", rwkv7_pth, "-o", state)
    result = rwkv("generate", "--state", state, "-n", "8", *GREEDY)
    session = prefill(loaded.model, loaded.tokenizer.encode("Prefix text"))
    chunks = stream_generate(
        loaded.model,
        loaded.tokenizer,
        "",
        params=SamplingParams(temperature=0),
        generator=make_generator(0)[0],
        max_tokens=8,
        session=session,
    )
    assert result.returncode == 0
    assert result.stdout.decode() == "".join(chunk.text for chunk in chunks)


@pytest.mark.parametrize("source", ["argument", "stdin", "file"])
def test_save_state_reads_text_from_each_source(tmp_path, rwkv7_pth, loaded, source) -> None:
    text, state = "A system prompt, processed once.\n", tmp_path / "s.rwkvstate"
    args, stdin = ["save-state", "-m", rwkv7_pth, "-o", state], None
    if source == "argument":
        args.insert(1, text)
    elif source == "stdin":
        stdin = text.encode()
    else:
        (tmp_path / "prompt.txt").write_text(text)
        args += ["-f", tmp_path / "prompt.txt"]
    result = rwkv(*args, stdin=stdin)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    saved = read_state_file(state)
    expected = prefill(loaded.model, loaded.tokenizer.encode(text))
    session = saved.session_for(loaded.model, loaded.tokenizer.name)
    assert saved.tokens_consumed == expected.tokens_consumed
    assert saved.text_tail == text
    assert (session.logits == expected.logits).all()


def test_save_state_can_extend_a_saved_state(tmp_path, rwkv7_pth, loaded) -> None:
    base, extended = tmp_path / "base.rwkvstate", tmp_path / "more.rwkvstate"
    rwkv_ok("save-state", "First part.", "-m", rwkv7_pth, "-o", base)
    result = rwkv("save-state", " Second part.", "--state", base, "-o", extended)
    assert result.returncode == 0, result.stderr
    expected = prefill(
        loaded.model,
        loaded.tokenizer.encode(" Second part."),
        prefill(loaded.model, loaded.tokenizer.encode("First part.")),
    )
    saved = read_state_file(extended)
    assert saved.tokens_consumed == expected.tokens_consumed
    assert (saved.logits == expected.logits).all()


def test_states_saved_onto_a_symbolic_link_replace_the_file_it_points_to(tmp_path, rwkv7_pth):
    (tmp_path / "states").mkdir()
    target = tmp_path / "states" / "s.rwkvstate"
    link = tmp_path / "latest.rwkvstate"
    link.symlink_to(target)
    saved = rwkv("save-state", "Hello", "-m", rwkv7_pth, "-o", link)
    assert saved.returncode == 0, saved.stderr
    assert link.is_symlink() and read_state_file(target).text_tail == "Hello"
    more = rwkv("generate", " there", "--state", link, "--save-state", link, "-n", "2", *GREEDY)
    assert more.returncode == 0, more.stderr
    assert link.is_symlink()
    assert read_state_file(target).text_tail == "Hello there" + more.stdout.decode()
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "latest.rwkvstate",
        "s.rwkvstate",
        "states",
    ]


def test_load_state_continues_piped_text_like_generate(tmp_path, rwkv7_pth) -> None:
    state = tmp_path / "s.rwkvstate"
    rwkv_ok("save-state", "Story:", "-m", rwkv7_pth, "-o", state)
    via_load = rwkv("load-state", state, "-n", "8", *GREEDY, stdin=b" once")
    via_generate = rwkv("generate", " once", "--state", state, "-n", "8", *GREEDY)
    assert via_load.returncode == 0, via_load.stderr
    assert via_load.stdout == via_generate.stdout != b""
    assert via_load.stderr == b""


def test_load_state_info_and_json(tmp_path, rwkv7_pth) -> None:
    state = tmp_path / "s.rwkvstate"
    rwkv_ok("generate", "Hi", "-m", rwkv7_pth, "-n", "3", "--seed", "4", "--save-state", state)
    info = rwkv("load-state", state, "--info")
    as_json = rwkv("load-state", state, "--info", "--json")
    assert info.returncode == as_json.returncode == 0
    text = info.stdout.decode()
    assert (
        "RWKV-7 L2 D128" in text and "tokens_consumed: 4" in text and "seed:            4" in text
    )
    details = json.loads(as_json.stdout)
    assert details["tokens_consumed"] == 4 and details["model"] == str(rwkv7_pth)
    assert details["sampling"]["temperature"] == 1.0 and details["has_rng_state"] is True


def test_text_the_output_encoding_lacks_is_replaced_not_a_crash(tmp_path, rwkv7_pth) -> None:
    state = tmp_path / "s.rwkvstate"
    rwkv_ok("save-state", "café", "-m", rwkv7_pth, "-o", state)
    result = rwkv("load-state", state, "--info", env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr
    assert b"'caf?'" in result.stdout


def test_state_for_another_model_is_one_line_error(tmp_path, rwkv7_pth, rwkv7_deeper_pth) -> None:
    state = tmp_path / "s.rwkvstate"
    rwkv_ok("save-state", "x", "-m", rwkv7_pth, "-o", state)
    result = rwkv("generate", "y", "--state", state, "-m", rwkv7_deeper_pth)
    assert_one_line_error(result, 1, "state was made by RWKV-7 L2 D128; model is RWKV-7 L3 D128")
    assert f"Hint: it was made with {rwkv7_pth} (RWKV-7 L2 D128)" in result.stderr.decode()


def test_a_state_whose_tokenizer_the_model_lacks_says_what_differs(tmp_path, rwkv7_pth) -> None:
    state = tmp_path / "demo.rwkvstate"
    rwkv_ok("save-state", "And God", "-m", "demo", "-o", state)  # the demo's own BPE tokenizer
    result = rwkv("generate", "y", "--state", state, "-m", rwkv7_pth)
    assert_one_line_error(result, 1, "state was made by RWKV-7 L6 D192; model is RWKV-7 L2 D128")


def test_a_state_whose_model_is_gone_says_so_and_resumes_with_m(tmp_path, rwkv7_pth) -> None:
    moved = tmp_path / "moved.pth"
    shutil.copyfile(rwkv7_pth, moved)
    state = tmp_path / "s.rwkvstate"
    rwkv_ok("save-state", "x", "-m", moved, "-o", state)
    moved.unlink()  # as if the state came from another machine
    result = rwkv("load-state", state, "-n", "2", stdin=b" y")
    assert_one_line_error(result, 1, f"{state} was made with a model that is not here", "moved.pth")
    assert "Hint: pass that model (RWKV-7 L2 D128) with -m MODEL" in result.stderr.decode()
    resumed = rwkv("load-state", state, "-m", rwkv7_pth, "-n", "2", stdin=b" y")
    assert resumed.returncode == 0 and resumed.stdout


def test_fine_tune_state_needs_force(tmp_path, rwkv7_pth, rwkv7_other_weights_pth) -> None:
    state = tmp_path / "s.rwkvstate"
    rwkv_ok("save-state", "x", "-m", rwkv7_pth, "-o", state)
    refused = rwkv("generate", "y", "--state", state, "-m", rwkv7_other_weights_pth)
    assert_one_line_error(refused, 1, "other weights of the same shape")
    assert "--force" in refused.stderr.decode().splitlines()[1]
    forced = rwkv(
        "generate", "y", "--state", state, "-m", rwkv7_other_weights_pth, "--force", "-n", "3"
    )
    assert forced.returncode == 0 and forced.stdout


def test_corrupt_and_missing_state_files(tmp_path, rwkv7_pth) -> None:
    corrupt = tmp_path / "bad.rwkvstate"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert_one_line_error(rwkv("load-state", corrupt), 1, "truncated or corrupt")
    assert_one_line_error(rwkv("load-state", tmp_path / "nope"), 1, "no such state file")
    assert_one_line_error(
        rwkv("generate", "x", "--state", tmp_path / "nope"), 1, "no such state file"
    )
    assert_one_line_error(rwkv("load-state", tmp_path), 1, "is a directory, not a state file")


def test_a_state_file_with_flipped_bytes_is_refused_as_corrupt(tmp_path, rwkv7_pth) -> None:
    state = tmp_path / "s.rwkvstate"
    rwkv("save-state", "A long document, read once.", "-m", rwkv7_pth, "-o", state)
    flip_tensor_bytes(state)
    message = "its tensor data does not match its checksum"
    assert_one_line_error(rwkv("load-state", state, "--info"), 1, "is corrupt", message)
    resumed = rwkv("generate", " more", "--state", state, "-n", "2")
    assert_one_line_error(resumed, 1, f"state file {state} is corrupt", message)


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "Hi", "--save-state"],
        ["save-state", "Hi", "-o"],
        ["chat", "--autosave"],
    ],
)
def test_an_output_file_that_cannot_be_written_stops_before_any_work(
    tmp_path, rwkv7_pth, command
) -> None:
    for target, reason in [
        (tmp_path / "missing-dir" / "s.rwkvstate", "there is no directory"),
        (tmp_path, "it is a directory"),
    ]:
        result = rwkv(*command, target, "-m", rwkv7_pth, stdin=b"Hi\n")
        assert_one_line_error(result, 1, "cannot write", reason)
    assert list(tmp_path.iterdir()) == []
    dash = rwkv(*command, "-", "-m", rwkv7_pth, stdin=b"Hi\n")  # not a file named "-"
    assert_one_line_error(dash, 2, "state files are binary: name a file")


def test_state_tuning_file_needs_its_model(state_tuning_pth, rwkv7_pth) -> None:
    refused = rwkv("generate", "Hi", "--state", state_tuning_pth)
    assert_one_line_error(refused, 1, "state-tuning file")
    plain = rwkv("generate", "Hi", "-m", rwkv7_pth, "-n", "8", *GREEDY)
    tuned = rwkv("generate", "Hi", "-m", rwkv7_pth, "--state", state_tuning_pth, "-n", "8", *GREEDY)
    assert tuned.returncode == 0 and tuned.stdout != plain.stdout


def test_a_model_given_as_a_state_says_to_pass_it_with_m(rwkv7_pth, rwkv7_safetensors) -> None:
    for model in (rwkv7_pth, rwkv7_safetensors):
        for command in (("load-state", model), ("generate", "Hi", "--state", model)):
            result = rwkv(*command, stdin=b"more")
            assert_one_line_error(result, 1, f"{model} is a model checkpoint, not a state file")
            assert f"Hint: pass it with -m {model}" in result.stderr.decode()


def test_a_state_given_as_a_model_says_to_pass_it_with_state(tmp_path, rwkv7_pth) -> None:
    state = tmp_path / "s.rwkvstate"
    rwkv("save-state", "x", "-m", rwkv7_pth, "-o", state)
    result = rwkv("generate", "Hi", "-m", state)
    assert_one_line_error(result, 1, f"{state}: this is an rwkv-cli state file, not a model")
    assert "Hint: pass it with --state FILE or to rwkv load-state FILE" in result.stderr.decode()


@pytest.mark.parametrize(
    ("stop", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
)
def test_ctrl_c_or_kill_keeps_the_previous_state_file(tmp_path, rwkv7_pth, stop, code) -> None:
    state = tmp_path / "s.rwkvstate"
    rwkv_ok("save-state", "Safe.", "-m", rwkv7_pth, "-o", state)
    before = state.read_bytes()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rwkv_cli",
            "generate",
            "x",
            "--state",
            str(state),
            "--save-state",
            str(state),
            "-n",
            "100000",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.read(20)
    process.send_signal(stop)
    process.communicate(timeout=SLOW_MACHINE_TIMEOUT_S)
    assert process.returncode == code
    assert state.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.rwkvstate"]
