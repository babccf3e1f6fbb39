"""``python -m bench.run`` refuses a bad ``--worker-env``, and ``python -m bench.groupby`` bad options, in one line,
before they start anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import groupby, run


@pytest.mark.parametrize(("item", "says"), [
    ("BATCH_MAX_BYTES=1", "takes DETECTOR_NAME=VALUE, not 'BATCH_MAX_BYTES=1'"),
    ("DETECTOR_WORKER__BATCH_MAX_BYTES", "takes DETECTOR_NAME=VALUE"),
    ("DETECTOR_WORKER__BATCH_MAX_BYTE=1", "unknown setting DETECTOR_WORKER__BATCH_MAX_BYTE"),
    ("DETECTOR_WORKER__BATCH_MAX_BYTES=1MiB", "DETECTOR_WORKER__BATCH_MAX_BYTES='1MiB' is not a valid int"),
    ("DETECTOR_TOPICS__PARTITIONS=8", "DETECTOR_TOPICS__PARTITIONS is set by the benchmark itself"),
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


def test_a_phase_setting_wins_over_worker_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    envs: list[dict[str, str]] = []
    monkeypatch.setattr(run, "WORKER_ENV", {"DETECTOR_WORKER__SHARE_CLUSTERS": "true",
                                            "DETECTOR_WORKER__BATCH_MAX_BYTES": "2097152"})
    monkeypatch.setattr(run.subprocess, "Popen", lambda *a, env, **k: envs.append(env))
    run.start_workers("127.0.0.1:1", "app", run.topic_names("app"), 1, tmp_path,
                      {"DETECTOR_WORKER__SHARE_CLUSTERS": "false"})
    assert envs[0]["DETECTOR_WORKER__SHARE_CLUSTERS"] == "false"
    assert envs[0]["DETECTOR_WORKER__BATCH_MAX_BYTES"] == "2097152"
    assert envs[0]["DETECTOR_WORKER__APP_ID"] == "app"


@pytest.mark.parametrize(("args", "says"), [
    (["--rates", "500,fast"], "--rates must be numbers separated by commas, got '500,fast'"),
    (["--modes", "direct,shuffle"], "--modes takes some of direct, group_by, bundled, got 'direct,shuffle'"),
])
def test_the_group_by_bench_refuses_bad_options_in_one_line(args: list[str], says: str,
                                                            capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run, "start_broker", lambda *a, **k: pytest.fail("a broker was started"))
    assert groupby.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {says}"]
