"""Every subcommand validates its configuration before it does anything: an unknown key is refused
with exit status 2 and one line naming the key (eval-grounding once had no schema and failed with
a TypeError instead)."""
from __future__ import annotations

import pytest

from dcam.pipeline.cli import COMMANDS, main

# `report` takes a run directory and its own options (tests/pipeline/report/test_gate.py).
CONFIGURED = sorted(c for c in COMMANDS if c != "report")


@pytest.mark.parametrize("command", CONFIGURED)
def test_an_unknown_key_is_refused_before_anything_runs(command, capsys):
    assert main([command, "no_such_key_zz=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "no_such_key_zz" in err[-1] and "Traceback" not in "\n".join(err)
