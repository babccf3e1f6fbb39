"""``detector``: the command line. The only place that reads the environment, configures logging and
prints. Every error is one line on stderr and a non-zero exit; ``--debug`` shows the traceback."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from detector.progress import Progress
from detector.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from detector.ratelimit import DecisionBook

log = logging.getLogger("detector")


class CliError(Exception):
    """A user-facing error: printed as one line."""


# ------------------------------------------------------------------------------------------------------
def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from detector.detection import Detector
    from detector.replay import replay_file

    if not args.events.exists():
        raise CliError(f"no such file: {args.events}")
    det = Detector(settings.detection, anomaly_model=args.model, key_secret=settings.fingerprint_key.reveal().encode())
    prog = Progress("replay")
    result = replay_file(args.events, args.out, det, sort_by_time=args.sort, progress=prog.update)
    prog.update(result.events)
    prog.close()
    invalid = sum(result.invalid.values())
    detail = ", ".join(f"{k}={v}" for k, v in sorted(result.invalid.items()))
    print(f"replay: events={result.events} invalid={invalid}{' (' + detail + ')' if detail else ''} "
          f"records={det.stats['records']} key_blocks={len(result.key_blocks)} actions={det.action_counts()} "
          f"out={args.out or '-'}")
    return 0


def _envelope_option(n: int) -> int:
    from detector.envelope import MAX_EVENTS

    if not 0 <= n <= MAX_EVENTS:
        raise CliError(f"--envelope must be 0 (one event per message) to {MAX_EVENTS}, not {n}")
    return n


def cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    from detector import simulate

    envelope_max_events = _envelope_option(args.envelope)

    if args.scenario not in simulate.scenario_names():
        raise CliError(f"unknown scenario {args.scenario!r}; choose one of {', '.join(simulate.scenario_names())}")
    sim = simulate.build(args.scenario, seed=args.seed, scale=args.scale, prompts_dir=args.prompts_dir,
                         fingerprint_key=settings.fingerprint_key.reveal().encode())
    print(sim.description, file=sys.stderr)
    prog = Progress("simulate", total=sim.count_hint())
    if args.kafka is None and args.out is None:
        raise CliError("give --out FILE.jsonl or --kafka BOOTSTRAP")
    if args.out is not None:
        n = simulate.write_jsonl(sim, args.out, args.labels, progress=prog.update)
    else:
        from detector.streaming.topics import kafka_client_config  # kafka-python options; imports no Faust

        security = kafka_client_config(settings.kafka)
        del security["bootstrap_servers"]  # --kafka may name other brokers; DETECTOR_KAFKA__* says how to log in
        n = publish_simulation(sim, args.kafka or settings.kafka.bootstrap, settings.topics.api_calls,
                               rate=args.rate, progress=prog.update, labels_path=args.labels, kafka_config=security,
                               envelope_max_events=envelope_max_events)
    prog.update(n)
    prog.close()
    attack = sum(1 for lab in sim.labels.values() if lab.attack)
    print(f"simulate: scenario={sim.name} events={n} accounts={len(sim.labels)} attack_accounts={attack} "
          f"to={args.out or args.kafka}")
    return 0


def publish_simulation(sim, bootstrap: str, topic: str, *, rate: float = 0.0, progress=None,  # type: ignore[no-untyped-def]
                       labels_path: Path | None = None, stop=None, kafka_config=None,
                       envelope_max_events: int = 0) -> int:
    """Publish a simulation's events through the gateway SDK, at most ``rate`` events/s (0 = no limit).

    ``kafka_config``: kafka-python security options for :class:`~detector.gateway.EventPublisher`.
    ``envelope_max_events`` > 0: in envelopes of up to that many events (the SDK's envelope mode)."""
    import time

    import orjson

    from detector.gateway import EventPublisher

    if labels_path is not None:
        labels_path.write_bytes(orjson.dumps({a: vars(lab) for a, lab in sim.labels.items()}))
    n = 0
    start = time.monotonic()
    with EventPublisher(bootstrap, topic, envelope_max_events=envelope_max_events, **(kafka_config or {})) as pub:
        for ev in sim.events():
            if stop is not None and stop():
                break
            pub.publish(ev)
            n += 1
            if rate > 0:
                ahead = n / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
            if progress is not None and n % 1000 == 0:
                progress(n)
    return n


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from detector.streaming.app import run_worker

    run_worker(settings)
    return 0


def cmd_chaos(args: argparse.Namespace, settings: Settings) -> int:
    from detector.chaos import run_chaos

    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # every refused connection during the broker restart
    result = run_chaos(duration_s=args.duration, rate=args.rate, envelope_max_events=_envelope_option(args.envelope))
    print(result.summary())
    return 0 if result.ok else 1


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from detector.demo import run_demo

    return run_demo(settings, duration_s=args.duration, scenario=args.scenario, rate=args.rate)


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from detector import simulate
    from detector.evaluation import DEFAULT_SUITE, run_evaluation, suite_entry

    first_hours = 0.0  # the first scenario's length: the restart runs on it
    for name in args.scenario or DEFAULT_SUITE:  # every entry checked before anything runs
        try:
            scenario, seed = suite_entry(name, args.seed, simulate.scenario_names())
            days = simulate.config(scenario, seed=seed, days=args.days).days
        except ValueError as exc:
            raise CliError(str(exc)) from None
        first_hours = first_hours or 24.0 * days
    # A time at or past the first scenario's end would restart nothing.
    if args.restart_at < 0 or args.restart_at >= first_hours:
        raise CliError(f"--restart-at {args.restart_at:g}: must be 0 (no restart) or a time within the first "
                       f"scenario's {first_hours:g} hours")
    return run_evaluation(settings, scenarios=args.scenario, models=args.models, scale=args.scale,
                          out_dir=args.out_dir, seed=args.seed, compare_all=args.compare_all,
                          workers=tuple(args.workers), restart_at_h=args.restart_at, days=args.days)


def _worker_counts(text: str) -> tuple[int, ...]:
    """``--workers``: a comma-separated list of worker counts above 1 ("0" for none).

    >>> _worker_counts("2,4"), _worker_counts("0")
    ((2, 4), ())
    """
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if counts == (0,):
        return ()
    if any(n < 2 or n > 64 for n in counts):
        raise argparse.ArgumentTypeError(f"{text!r}: each worker count must be between 2 and 64 (or 0 for none)")
    return counts


def cmd_review(args: argparse.Namespace, settings: Settings) -> int:
    from detector import review

    actions = review.ACTIONS if args.action == ["any"] else tuple(args.action or review.DEFAULT_ACTIONS)
    since_ms = None
    if args.since:
        try:
            since_ms = int((time.time() - review.parse_duration(args.since)) * 1000)
        except ValueError as exc:
            raise CliError(f"--since: {exc}") from None
    book = _read_book(settings, args.timeout)
    views = review.select(book.decisions(), actions=actions, cluster=args.cluster, since_ms=since_ms,
                          accounts=args.account or ())
    missing = sorted(set(args.account or ()) - {d.account_id for v in views for d in v.accounts})
    if missing:
        print(f"review: no record for {', '.join(missing)} on {settings.topics.risk_scores}: allowed (an account "
              "with no record is allowed)", file=sys.stderr)
    if args.json:
        for v in views:
            print(orjson.dumps(v.to_json()).decode())
    else:
        for line in review.render(views, per_cluster=args.per_cluster):
            print(line)
    accounts = sum(len(v.accounts) for v in views)
    invalid = book.invalid_total()
    print(f"review: {len(book):,} accounts with a record on {settings.topics.risk_scores}; {accounts:,} at "
          f"{'/'.join(actions)} in {len(views):,} group{'s' * (len(views) != 1)}"
          f"{f'; {invalid:,} invalid records skipped' if invalid else ''}", file=sys.stderr)
    return 0


def _read_book(settings: Settings, timeout_s: float) -> DecisionBook:
    from detector import review

    prog = Progress("review", unit="records")

    def seen(n: int, total: int) -> None:
        prog.total = total
        prog.update(n)

    try:
        book = review.read_decisions(settings, timeout_s=timeout_s, progress=seen)
    except TimeoutError as exc:
        raise CliError(str(exc)) from None
    if prog.done:
        prog.close()
    return book


def cmd_label(args: argparse.Namespace, settings: Settings) -> int:
    from detector import review

    accounts = list(args.accounts)
    if args.cluster:
        book = _read_book(settings, args.timeout)
        members = [d.account_id for v in review.select(book.decisions(), actions=review.ACTIONS, cluster=args.cluster)
                   for d in v.accounts]
        if not members:
            raise CliError(f"no account's latest record on {settings.topics.risk_scores} names cluster {args.cluster}")
        if not args.yes:
            raise CliError(f"would label {len(members)} account{'s' * (len(members) != 1)} of cluster {args.cluster} "
                           f"as {args.verdict}; add --yes to publish")
        accounts += members
    if not accounts:
        raise CliError("name the accounts to label, or --cluster ID")
    labels = review.build_labels(accounts, args.verdict, args.analyst, args.note)
    n = review.publish_labels(settings, labels)
    print(f"label: {n} {args.verdict} label{'s' * (n != 1)} published to {settings.topics.analyst_labels} "
          f"(analyst {args.analyst})")
    return 0


# ------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detector", description="Streaming detector of LLM distillation attacks.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("replay", help="run the detection core over a JSONL file of events (no Kafka)")
    r.add_argument("events", type=Path, help="events, one JSON object per line")
    r.add_argument("--out", type=Path, help="write risk-score records here (JSONL)")
    r.add_argument("--sort", action="store_true", help="sort by event time first (input out of order)")
    r.add_argument("--model", default=None,
                   help="anomaly model: population, hst or loda (default: DETECTOR_DETECTION__ANOMALY_MODEL)")
    r.set_defaults(func=cmd_replay)

    s = sub.add_parser("simulate", help="simulated traffic with distillation campaigns, to a file or Kafka")
    s.add_argument("--scenario", default="default", help="scenario name (default: default)")
    s.add_argument("--seed", type=int, default=7)
    s.add_argument("--scale", type=float, default=1.0, help="multiplies account counts")
    s.add_argument("--out", type=Path, help="write events as JSONL")
    s.add_argument("--labels", type=Path, help="write ground-truth account labels (JSON)")
    s.add_argument("--kafka", nargs="?", const="", default=None, metavar="BOOTSTRAP",
                   help="publish to Kafka instead (default bootstrap from settings)")
    s.add_argument("--rate", type=float, default=0.0, help="events/s when publishing (0 = as fast as possible)")
    s.add_argument("--envelope", type=int, default=0, metavar="N",
                   help="with --kafka: send envelopes of up to N events, one per partition, at least every 50 ms "
                        "(0 = one event per message, the default)")
    s.add_argument("--prompts-dir", type=Path, default=None,
                   help="real prompt datasets (default: ../shared/datasets/prompts)")
    s.set_defaults(func=cmd_simulate)

    w = sub.add_parser("worker", help="run the Faust worker: api-calls -> risk-scores (settings from DETECTOR_*)")
    w.set_defaults(func=cmd_worker)

    d = sub.add_parser("demo", help="broker + worker + simulated traffic, with live progress")
    d.add_argument("--duration", type=float, default=None, help="stop after S seconds and print a summary")
    d.add_argument("--scenario", default="demo")
    d.add_argument("--rate", type=float, default=3000.0, help="simulated events/s")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("chaos", help="kill -9 workers, restart the broker, rebalance under load; count every event")
    c.add_argument("--duration", type=float, default=90.0, help="seconds of traffic (faults at fixed shares of it)")
    c.add_argument("--rate", type=float, default=500.0, help="simulated events/s")
    c.add_argument("--envelope", type=int, default=0, metavar="N",
                   help="the gateway sends envelopes of up to N events (20%% of events still single; 0 = none)")
    c.set_defaults(func=cmd_chaos)

    e = sub.add_parser("evaluate", help="scenarios through replay; precision/recall/FPR; writes EVALUATION.md")
    e.add_argument("--scenario", action="append",
                   help="scenario(s), each NAME or NAME@SEED (its own seed) (default: the evaluation suite)")
    e.add_argument("--models", default="population,hst,loda", help="anomaly models to compare")
    e.add_argument("--scale", type=float, default=1.0)
    e.add_argument("--seed", type=int, default=7)
    e.add_argument("--days", type=int, default=None, metavar="N",
                   help="run every scenario N simulated days instead of its own (as many accounts of each kind; "
                        "the suite's run 3-4), e.g. 44 for the documented campaign's length")
    e.add_argument("--out-dir", type=Path, default=Path("."), help="where EVALUATION.md and plots go")
    e.add_argument("--compare-all", action="store_true",
                   help="run every model on every scenario (default: compare on the first, then the chosen one)")
    e.add_argument("--workers", type=_worker_counts, default=(2, 4), metavar="N,M",
                   help="also run the first scenario with the accounts split over N (and M...) workers, as that many "
                        "workers would hold them; 0 to skip (default: 2,4)")
    e.add_argument("--restart-at", type=float, default=36.0, metavar="HOURS",
                   help="also run the first scenario with the worker restarted HOURS in, cold and warm (the warm "
                        "start from cluster-signals); 0 to skip (default: 36)")
    e.set_defaults(func=cmd_evaluate)

    v = sub.add_parser("review", help="SOC: accounts the detector throttles or blocks, by cluster, with reasons "
                                      "(reads risk-scores)")
    v.add_argument("--action", action="append", choices=("allow", "watch", "throttle", "block", "any"),
                   help="list accounts at this action (repeatable; default: throttle and block)")
    v.add_argument("--cluster", help="only this cluster")
    v.add_argument("--account", action="append", metavar="ID",
                   help="only this account, at any action (repeatable): why it is limited, or not")
    v.add_argument("--since", help="only records emitted within this long (30m, 6h, 2d)")
    v.add_argument("--per-cluster", type=int, default=5, metavar="N", help="accounts shown per cluster (default 5)")
    v.add_argument("--json", action="store_true", help="one JSON object per cluster, with every member")
    v.add_argument("--timeout", type=float, default=60.0, help="seconds to read the topic (default 60)")
    v.set_defaults(func=cmd_review)

    lb = sub.add_parser("label", help="SOC: publish an analyst verdict (attack blocks, benign allowlists) to "
                                      "analyst-labels")
    lb.add_argument("verdict", choices=("attack", "benign"))
    lb.add_argument("accounts", nargs="*", metavar="ACCOUNT", help="account ids")
    lb.add_argument("--cluster", help="every account whose latest risk-score record names this cluster")
    lb.add_argument("--analyst", required=True, help="who decides: an analyst id or a review queue")
    lb.add_argument("--note", help="free text kept with the verdict (a ticket id; at most 512 characters)")
    lb.add_argument("--yes", action="store_true", help="with --cluster: publish (without it, says how many)")
    lb.add_argument("--timeout", type=float, default=60.0, help="seconds to read risk-scores for --cluster")
    lb.set_defaults(func=cmd_label)

    try:
        from detector.broker import add_broker_commands

        add_broker_commands(sub)
    except ImportError:  # pragma: no cover
        pass
    from detector.ratelimit import add_ratelimit_command

    add_ratelimit_command(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"detector: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else getattr(logging, settings.log_level.upper(), 20),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.debug:
        for noisy in ("kafka", "aiokafka"):  # client chatter at INFO drowns the detector's own lines
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "broker":
            return int(args.func(args) or 0)
        return int(args.func(args, settings) or 0)
    except KeyboardInterrupt:
        print("detector: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's one-line error contract
        if args.debug:
            raise
        from detector.broker import BrokerError
        from detector.schemas import InvalidEvent
        from detector.streaming.topics import KafkaConnectError

        known = (CliError, BrokerError, InvalidEvent, KafkaConnectError, SettingsError, FileNotFoundError,
                 PermissionError)
        kind = "error" if isinstance(exc, known) else f"internal error ({type(exc).__name__})"
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"detector: {kind}: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
