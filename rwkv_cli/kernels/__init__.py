"""WKV recurrence implementations: plain torch references now, compiled kernels later."""
