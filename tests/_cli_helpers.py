"""What the command-line tools' tests share (convzoo-autotune, convzoo-bench, convzoo-gpu-check): the check that a
bad argument is refused before any work, with exit 2 and one line naming it after the usage, and the bad-argument
cases of the checks the tools share (``convzoo/tools/_cli.py``), written once and given each tool's flag."""

import pytest
import torch


def assert_refused(parse, argv, prog: str, message: str, capsys) -> None:
    """``parse(argv)`` exits 2, and the last line of stderr (after the usage) is ``<prog>: error: ...`` naming
    ``message``."""
    with pytest.raises(SystemExit) as e:
        parse(argv)
    last = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 2 and last.startswith(f"{prog}: error: ") and message in last, last


def cases(flag: str, message: str, *values: str) -> list[tuple[list[str], str]]:
    """``([flag, value], message)`` for each of ``values``: one check refusing each with the same message."""
    return [([flag, v], message) for v in values]


def name_cases(flag: str, what: str, known: str, unknown: str, choices: str = "") -> list[tuple[list[str], str]]:
    """``check_names``' refusals of ``flag``: an unknown name beside a known one, no name at all, a name twice
    (``choices``: the list the first two messages end with, where a test pins it)."""
    tail = f"; choose from {choices}" if choices else ""
    return [([flag, f"{known},{unknown}"], f"{flag}: unknown {what} {unknown!r}{tail}"),
            ([flag, ","], f"{flag}: no {what} named in ','{tail}"),
            ([flag, f"{known},{known}"], f"{flag}: {known!r} is named twice")]


def minutes_cases(flag: str, *values: str) -> list[tuple[list[str], str]]:
    """``check_minutes``' refusals of ``flag``: each of ``values`` is not positive or not finite."""
    return cases(flag, f"{flag} must be positive and finite", *values)


def device_cases(purpose: str) -> list[tuple[list[str], str]]:
    """``check_device``'s refusals: not a device at all, and a device of a type the tool does not run on."""
    return [(["--device", "bogus"], "--device: 'bogus' is not a device"),
            (["--device", "meta"], f"--device: {purpose}, not on 'meta'")]


def assert_absent_cuda_device_refused(parse, extra: list[str], prog: str, count: int, monkeypatch, capsys) -> None:
    """On a machine with ``count`` CUDA devices (faked), ``--device cuda:<count>`` is refused naming how many there
    are, and ``cuda:<count - 1>`` is taken (``extra``: the rest of the command line)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert_refused(parse, ["--device", f"cuda:{count}", *extra], prog,
                   f"--device: no CUDA device {count}; this machine has {count}", capsys)
    assert parse(["--device", f"cuda:{count - 1}", *extra]).device == f"cuda:{count - 1}"
