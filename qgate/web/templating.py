"""Jinja templates with the helpers every page uses (CSRF field, flashes, formatting)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.templating import Jinja2Templates
from starlette.responses import Response

from qgate.core.db.models import User
from qgate.web import display
from qgate.web.security import CSRF_FIELD, csrf_token

TEMPLATES_DIR = Path(__file__).parent / "templates"


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    env = templates.env
    env.globals.update(
        csrf_field=CSRF_FIELD,
        output_label=display.output_label,
        output_unit=display.output_unit,
        score_labels=display.SCORE_LABELS,
    )
    env.filters.update(
        value=display.fmt_value,
        when=display.fmt_dt,
        dicom_date=display.fmt_dicom_date,
        person=display.fmt_person_name,
        isotime=lambda d: d.isoformat() if d is not None else "",
    )
    return templates


def flash(request: Request, kind: str, text: str) -> None:
    """A message for the next page this session sees (kind: ok|error|info)."""
    request.session.setdefault("flash", []).append([kind, text])


def render(
    request: Request,
    name: str,
    *,
    user: User | None,
    status_code: int = 200,
    **context: Any,
) -> Response:
    templates: Jinja2Templates = request.app.state.templates
    settings = request.app.state.settings
    ctx = {
        "user": user,
        "csrf_token": csrf_token(request),
        "flashes": request.session.pop("flash", []),
        "gate_mode": settings.gate.mode,
        "node_name": settings.node_name,
        **context,
    }
    return templates.TemplateResponse(request, name, ctx, status_code=status_code)
