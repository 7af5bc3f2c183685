"""The ``qgate`` command line."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from qgate.core.config import Settings, load_settings

if TYPE_CHECKING:
    from qgate.core.stage import Stage


def _settings(ctx: click.Context) -> Settings:
    """The settings, loaded on first use: a subcommand's ``--config`` is parsed only after
    the group's callback has run, so loading cannot happen there."""
    state = ctx.find_root().ensure_object(dict)
    if "settings" not in state:
        try:
            settings = load_settings(state.get("config_path"))
        except (FileNotFoundError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
        verbose = bool(state.get("verbose"))
        default = getattr(logging, settings.log_level.upper(), logging.INFO)
        level = logging.DEBUG if verbose else default
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if not verbose:
            logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        state["settings"] = settings
    return state["settings"]  # type: ignore[no-any-return]


def _remember_config(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    """Callback of every ``--config``: the root context keeps the file for :func:`_settings`."""
    if value is None:
        return
    state = ctx.find_root().ensure_object(dict)
    earlier = state.get("config_path")
    if earlier is not None and earlier != value:
        raise click.UsageError(f"--config given twice, as {earlier} and as {value}")
    state["config_path"] = value


def _config_option() -> click.Option:
    return click.Option(
        ["--config", "config_path"],
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        expose_value=False,
        callback=_remember_config,
        help="config file (default: $QGATE_CONFIG, else ./config.yaml if present)",
    )


class _Group(click.Group):
    """A group whose commands and subgroups all take ``--config``, so ``qgate serve
    --config PATH`` works as well as ``qgate --config PATH serve``."""

    group_class = type  # subgroups made with @group.group() are _Group too

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if not any(p.name == "config_path" for p in cmd.params):
            cmd.params.append(_config_option())
        super().add_command(cmd, name)


def _sessions(settings: Settings):  # type: ignore[no-untyped-def]
    """A session factory on a migrated database; a clear error (no traceback) otherwise."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError

    from qgate.core.db import make_engine, make_session_factory

    engine = make_engine(settings.database.url)
    where = engine.url.render_as_string(hide_password=True)
    try:
        migrated = inspect(engine).has_table("alembic_version")
    except SQLAlchemyError as exc:
        raise click.ClickException(f"cannot open the database {where}: {exc}") from exc
    if not migrated:
        raise click.ClickException(
            f"the database {where} has no qgate schema; run `qgate db upgrade` first"
        )
    return make_session_factory(engine, node=settings.node_name)


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group(cls=_Group, params=[_config_option()])
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """qgate: a DICOM quality gate for CT.

    --config PATH is accepted before or after the command name.
    """
    ctx.ensure_object(dict)["verbose"] = verbose


@contextmanager
def _stop_on_signals(what: str) -> Iterator[threading.Event]:
    """An event that SIGTERM and SIGINT set while the block runs (the stage or the
    supervisor then stops); the previous handlers come back afterwards. ``what`` names
    this process in the log line ("stage worker", "qgate serve")."""
    done = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        logging.getLogger("qgate").info(
            "%s (pid %d): %s received, stopping", what, os.getpid(), name
        )
        done.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield done
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_stage(make: Callable[[], Stage], what: str) -> None:
    """Run the stage ``make()`` builds until SIGTERM/SIGINT; a clear error if it cannot.
    ``what`` names the process in the logs."""
    from qgate.core.stage import SchemaNotReady, run_stage

    with _stop_on_signals(what) as done:
        try:
            run_stage(make(), done)
        except (SchemaNotReady, OSError) as exc:
            raise click.ClickException(str(exc)) from exc


@main.command()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run every stage on this machine, each as a supervised process (migrates first)."""
    from qgate.core.service import Supervisor, config_args

    state = ctx.find_root().ensure_object(dict)
    settings = _settings(ctx)
    args = config_args(state.get("config_path"), verbose=bool(state.get("verbose")))
    with _stop_on_signals("qgate serve") as done:
        Supervisor(settings, cli_args=args).run(done)


@main.command()
@click.option("--listen-fd", type=int, hidden=True, help="(listener process) inherited socket")
@click.option("--slots", type=click.Path(path_type=Path), hidden=True)
@click.option("--parent", type=int, hidden=True)
@click.option("--listener", type=int, hidden=True, help="(listener process) its number")
@click.pass_context
def receive(
    ctx: click.Context,
    listen_fd: int | None,
    slots: Path | None,
    parent: int | None,
    listener: int | None,
) -> None:
    """Run the receive stage: the DICOM SCP (dicom.receivers processes) and series assembly."""
    from qgate.core.service import config_args
    from qgate.receive.listener import receive_argv
    from qgate.receive.stage import ReceiveListener, ReceiveStage

    settings = _settings(ctx)
    if listen_fd is not None:  # started by the receive stage (qgate/receive/listener.py)
        if slots is None or parent is None or listener is None:
            raise click.UsageError("--listen-fd needs --slots, --parent and --listener")
        _run_stage(
            lambda: ReceiveListener(
                settings, fd=listen_fd, slots=slots, parent=parent, index=listener
            ),
            f"receiver process {listener} of stage receive",
        )
        return
    state = ctx.find_root().ensure_object(dict)
    args = config_args(state.get("config_path"), verbose=bool(state.get("verbose")))
    _run_stage(lambda: ReceiveStage(settings, receive_argv=receive_argv(args)), "stage receive")


@main.command()
@click.option(
    "--slot",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="this worker process's number on this node (unique per node)",
)
@click.pass_context
def worker(ctx: click.Context, slot: int) -> None:
    """Run the score stage: queue.workers scoring threads and the scheduled housekeeping."""
    from qgate.score.stage import WorkerStage

    settings = _settings(ctx)
    _run_stage(lambda: WorkerStage(settings, slot=slot), f"stage worker (slot {slot})")


@main.command()
@click.pass_context
def dispatch(ctx: click.Context) -> None:
    """Run the dispatch stage: send the outbox to the archive."""
    from qgate.dispatch.stage import DispatchStage

    settings = _settings(ctx)
    _run_stage(lambda: DispatchStage(settings), "stage dispatch")


@main.command()
@click.pass_context
def web(ctx: click.Context) -> None:
    """Run the review app on web.host:web.port."""
    from qgate.web.stage import WebStage

    settings = _settings(ctx)
    _run_stage(lambda: WebStage(settings), "stage web")


@main.group()
def db() -> None:
    """Database schema management."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Apply the Alembic migrations."""
    from qgate.core.db import upgrade

    settings = _settings(ctx)
    upgrade(settings.database.url, revision, storage_root=settings.storage.root)
    click.echo(f"database at {revision}")


@main.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print a JSON list of result objects")
@click.pass_context
def score(ctx: click.Context, path: Path, as_json: bool) -> None:
    """Score every CT series under PATH, offline (no network, no database)."""
    from qgate.core.degrade import SkippedPart
    from qgate.score.pipeline import NothingScored, build_scorers, score_series
    from qgate.score.volume import SeriesLoadError, find_series

    settings = _settings(ctx)
    scorers = build_scorers(settings)
    results = []
    for uid, paths in sorted(find_series(path).items()):
        try:
            scored = score_series(paths, scorers, settings.gate.thresholds)
        except (SeriesLoadError, NothingScored) as exc:
            results.append(
                {
                    "series_instance_uid": uid,
                    "study_instance_uid": None,
                    "status": "failed",
                    "decision": None,
                    "reasons": [f"scoring failed: {exc}"],
                    "scores": {},
                }
            )
            continue
        vol = scored.loaded.volume
        results.append(
            {
                "series_instance_uid": uid,
                "study_instance_uid": vol.study_instance_uid,
                "status": "scored",
                "decision": scored.decision.decision,
                "reasons": list(scored.decision.reasons),
                "scores": scored.scores_json,
                "slices": vol.n_slices,
                "skipped": [{"path": str(p), "reason": r} for p, r in scored.loaded.skipped],
                "skipped_parts": [p.to_json() for p in scored.skipped_parts],
            }
        )
    if as_json:
        _echo_json(results)
        return
    if not results:
        click.echo(f"no DICOM series found under {path}")
    for r in results:
        click.echo(f"{r['series_instance_uid']}  {r['status']}  {r['decision'] or '-'}")
        for name, out in r["scores"].items():
            vals = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in out.items()
                if k not in ("slices", "version")
            )
            click.echo(f"  {name}: {vals}")
        for reason in r["reasons"]:
            click.echo(f"  ! {reason}")
        for part in r.get("skipped_parts", []):
            click.echo(f"  - {SkippedPart.from_json(part).describe()}")


@main.command()
@click.option("--series", "series_uid", default=None, help="one series")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def results(ctx: click.Context, series_uid: str | None, as_json: bool) -> None:
    """Show stored results."""
    from qgate.score.results import list_results

    with _sessions(_settings(ctx))() as session:
        rows = list_results(session, series_uid)
    if series_uid and not rows:
        raise click.ClickException(f"no such series: {series_uid}")
    if as_json:
        _echo_json(rows[0] if series_uid else rows)
        return
    for r in rows:
        click.echo(
            f"{r['series_instance_uid']}  {r['status']:9}  {r['decision'] or '-':4}  "
            f"{'; '.join(r['reasons'])}"
        )


@main.command()
@click.argument("series_uid")
@click.pass_context
def release(ctx: click.Context, series_uid: str) -> None:
    """Forward a held series (flagged in gate mode, or failed under gate.on_failure: hold)."""
    from qgate.web import actions

    settings = _settings(ctx)
    with _sessions(settings)() as session:
        try:
            n = actions.release(session, settings, series_uid=series_uid, actor=actions.CLI)
        except actions.ActionError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"released {series_uid}: {n} instance(s) queued for the archive")


@main.command()
@click.argument("series_uid")
@click.pass_context
def rescore(ctx: click.Context, series_uid: str) -> None:
    """Score a series again (a failed one, or to supersede its result); audited."""
    from qgate.web import actions

    with _sessions(_settings(ctx))() as session:
        try:
            job_id = actions.rescore(session, series_uid=series_uid, actor=actions.CLI)
        except actions.ActionError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"rescore {series_uid}: job {job_id} queued")


@main.command()
@click.argument("series_uid")
@click.pass_context
def resubmit(ctx: click.Context, series_uid: str) -> None:
    """Send a series' dead-lettered sends (results or originals) again; audited."""
    from qgate.web import actions

    with _sessions(_settings(ctx))() as session:
        try:
            n = actions.resubmit(session, series_uid=series_uid, actor=actions.CLI)
        except actions.ActionError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"resubmitted {n} send(s) of {series_uid}")


@main.group()
def outbox() -> None:
    """Outgoing C-STORE sends."""


@outbox.command("list")
@click.option("--state", type=click.Choice(["pending", "sending", "sent", "dead"]), default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def outbox_list(ctx: click.Context, state: str | None, as_json: bool) -> None:
    """List sends (default: all)."""
    from qgate.dispatch.outbox import list_items

    with _sessions(_settings(ctx))() as session:
        items = list_items(session, state=state)
        rows = [
            {
                "id": i.id,
                "series_instance_uid": i.series_instance_uid,
                "kind": i.kind,
                "destination": f"{i.dest_ae_title}@{i.dest_host}:{i.dest_port}",
                "files": len(i.paths),
                "state": i.state,
                "attempts": i.attempts,
                "next_attempt_at": i.next_attempt_at,
                "last_error": i.last_error,
            }
            for i in items
        ]
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        click.echo(
            f"{r['id']:6}  {r['state']:8} {r['kind']:8} {r['files']:5} files  "
            f"attempts={r['attempts']}  {r['destination']}  {r['last_error'] or ''}"
        )


@outbox.command("retry")
@click.argument("ids", nargs=-1, type=int)
@click.pass_context
def outbox_retry(ctx: click.Context, ids: tuple[int, ...]) -> None:
    """Resubmit dead letters (all of them, or IDS)."""
    from qgate.dispatch.outbox import retry

    with _sessions(_settings(ctx))() as session:
        n = retry(session, list(ids) or None)
    click.echo(f"resubmitted {n} send(s)")


@main.group()
def jobs() -> None:
    """Scoring jobs."""


@jobs.command("list")
@click.option("--state", type=click.Choice(["queued", "running", "done", "parked"]), default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def jobs_list(ctx: click.Context, state: str | None, as_json: bool) -> None:
    """List scoring jobs; parked ones carry their error."""
    from qgate.score.queue import list_jobs

    with _sessions(_settings(ctx))() as session:
        rows = [
            {
                "id": j.id,
                "series_instance_uid": j.series_instance_uid,
                "state": j.state,
                "generation": j.generation,
                "attempts": j.attempts,
                "last_error": j.last_error,
            }
            for j in list_jobs(session, [state] if state else None)
        ]
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        click.echo(
            f"{r['id']:6}  {r['state']:7} attempts={r['attempts']}  "
            f"{r['series_instance_uid']}  {r['last_error'] or ''}"
        )


@jobs.command("retry")
@click.argument("ids", nargs=-1, type=int)
@click.pass_context
def jobs_retry(ctx: click.Context, ids: tuple[int, ...]) -> None:
    """Requeue parked jobs (all, or IDS)."""
    from qgate.score.queue import retry_parked

    with _sessions(_settings(ctx))() as session:
        n = retry_parked(session, list(ids) or None)
    click.echo(f"requeued {n} job(s)")


@main.group()
def models() -> None:
    """Model versions: list them, activate one (also a rollback)."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def models_list(ctx: click.Context, as_json: bool) -> None:
    """Registered versions, and what each model kind serves now."""
    from qgate.core.registry import active_weights, list_versions

    settings = _settings(ctx)
    with _sessions(settings)() as session:
        serving = active_weights(session, root=settings.storage.root)
        rows = [
            {
                "model": v.model,
                "version": v.version,
                "parent": v.parent,
                "active": v.active,
                "sha256": v.sha256,
                "metrics": v.metrics,
                "created_at": v.created_at,
            }
            for v in list_versions(session)
        ]
    if as_json:
        _echo_json({"serving": {m: a.version for m, a in serving.items()}, "versions": rows})
        return
    for m, a in serving.items():
        click.echo(f"{m:9} serving {a.version}")
    for r in rows:
        mark = "*" if r["active"] else " "
        click.echo(f" {mark} {r['version']:40} parent={r['parent'] or '-'}")


@models.command("activate")
@click.argument("version")
@click.pass_context
def models_activate(ctx: click.Context, version: str) -> None:
    """Serve VERSION from the next scoring job on (use an older version to roll back)."""
    from qgate.core.registry import RegistryError, activate

    settings = _settings(ctx)
    with _sessions(settings)() as session:
        try:
            row = activate(session, version, root=settings.storage.root)
        except RegistryError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"{row.model}: now serving {row.version}")


@main.command()
@click.option(
    "--now", is_flag=True, help="run the retraining now (the service runs it on retrain.cron)"
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def retrain(ctx: click.Context, now: bool, as_json: bool) -> None:
    """Retrain MD-IQA on the reviewed series and promote it if it beats the serving model."""
    if not now:
        raise click.UsageError(
            "the nightly run is scheduled by `qgate serve` (retrain.cron); use --now to run it here"
        )
    from qgate.retrain import RetrainBusy, run_retrain

    settings = _settings(ctx)
    try:
        outcome = run_retrain(settings, _sessions(settings), trigger="cli")
    except RetrainBusy as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        _echo_json(outcome.to_json())
    else:
        click.echo(f"run {outcome.run_id}: {outcome.status}: {outcome.reason}")
        if outcome.candidate_version:
            click.echo(f"candidate {outcome.candidate_version} (parent {outcome.current_version})")
    if outcome.status == "failed":
        sys.exit(1)


@main.command()
@click.option("--dry-run", is_flag=True, help="only report what would be deleted")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def purge(ctx: click.Context, dry_run: bool, as_json: bool) -> None:
    """Apply the retention policy (retention.* in the config) once.

    Deletes spool originals that were delivered (or, in observe mode, scored) long
    enough ago, sent outgoing files, and old event/audit rows; never anything unsent or
    unscored. `qgate serve` runs the same on retention.cron.
    """
    from qgate.housekeeping.retention import run_purge

    settings = _settings(ctx)
    report = run_purge(settings, _sessions(settings), dry_run=dry_run)
    if as_json:
        _echo_json(report.to_json())
    else:
        click.echo(report.summary())
        for line in report.skipped:
            click.echo(f"skipped {line}")


@main.group()
def user() -> None:
    """Users of the review web app."""


@user.command("add")
@click.argument("name")
@click.option(
    "--role", type=click.Choice(["radiologist", "admin"]), required=True, help="what NAME may do"
)
@click.pass_context
def user_add(ctx: click.Context, name: str, role: str) -> None:
    """Create user NAME; the password is read from stdin (prompted for on a terminal)."""
    from qgate.web.users import UserError, create_user

    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    with _sessions(_settings(ctx))() as session:
        try:
            create_user(session, username=name, password=password, role=role, by="cli")
        except UserError as exc:
            raise click.ClickException(str(exc)) from exc
        session.commit()
    click.echo(f"user {name} added ({role})")


def _read_password() -> str:
    if sys.stdin.isatty():
        return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))
    return sys.stdin.readline().rstrip("\r\n")


def _change_user(ctx: click.Context, change: Any, done: str) -> None:
    """Run ``change(session)`` (a qgate.web.users function, audited as by "cli") and commit."""
    from qgate.web.users import UserError

    with _sessions(_settings(ctx))() as session:
        try:
            change(session)
        except UserError as exc:
            raise click.ClickException(str(exc)) from exc
        session.commit()
    click.echo(done)


@user.command("disable")
@click.argument("name")
@click.pass_context
def user_disable(ctx: click.Context, name: str) -> None:
    """Disable user NAME: no logins; open sessions end at their next request."""
    from qgate.web.users import set_active

    _change_user(ctx, lambda s: set_active(s, username=name, active=False), f"user {name} disabled")


@user.command("enable")
@click.argument("name")
@click.pass_context
def user_enable(ctx: click.Context, name: str) -> None:
    """Re-enable user NAME."""
    from qgate.web.users import set_active

    _change_user(ctx, lambda s: set_active(s, username=name, active=True), f"user {name} enabled")


@user.command("password")
@click.argument("name")
@click.pass_context
def user_password(ctx: click.Context, name: str) -> None:
    """Reset the password of NAME (read from stdin, prompted for on a terminal)."""
    from qgate.web.users import reset_password

    password = _read_password()
    _change_user(
        ctx,
        lambda s: reset_password(s, username=name, password=password),
        f"password of {name} reset",
    )


@user.command("unlock")
@click.argument("name")
@click.pass_context
def user_unlock(ctx: click.Context, name: str) -> None:
    """Forget the failed logins that throttle NAME."""
    from qgate.web.users import unlock_user

    _change_user(ctx, lambda s: unlock_user(s, username=name), f"user {name} unlocked")


if __name__ == "__main__":
    sys.exit(main())
