"""``python -m bench.run`` refuses a bad ``--worker-env`` in one line, before it starts anything."""

from __future__ import annotations

import pytest

from bench import run


@pytest.mark.parametrize(("item", "says"), [
    ("BATCH_MAX_BYTES=1", "takes DETECTOR_NAME=VALUE, not 'BATCH_MAX_BYTES=1'"),
    ("DETECTOR_WORKER__BATCH_MAX_BYTES", "takes DETECTOR_NAME=VALUE"),
    ("DETECTOR_WORKER__BATCH_MAX_BYTE=1", "unknown setting DETECTOR_WORKER__BATCH_MAX_BYTE"),
    ("DETECTOR_WORKER__BATCH_MAX_BYTES=1MiB", "DETECTOR_WORKER__BATCH_MAX_BYTES='1MiB' is not a valid int"),
])
def test_a_bad_worker_setting_is_refused_in_one_line(item: str, says: str, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run, "WORKER_ENV", {})
    monkeypatch.setattr(run, "run", lambda *a, **k: pytest.fail("a phase ran"))
    with pytest.raises(SystemExit) as exc:
        run.main(["--worker-env", item, "--phases", "replay"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert says in err[-1] and "Traceback" not in "\n".join(err)
