"""The worklist page (``/``): flagged series by default, filters, newest first, pages."""

from __future__ import annotations

import math
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from qgate.web import crud
from qgate.web.deps import CurrentUser, SessionDep, SettingsDep
from qgate.web.display import headline
from qgate.web.schemas import WorklistQuery
from qgate.web.templating import render

router = APIRouter(include_in_schema=False)


@router.get("/")
def worklist(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    user: CurrentUser,
    query: Annotated[WorklistQuery, Query()],
) -> Response:
    per_page = query.per_page or settings.web.page_size
    rows, total = crud.list_series(session, query=query, per_page=per_page)
    thresholds = list(settings.gate.thresholds)
    columns = [
        (t, [headline(r.result.scores, t) if r.result else ("–", False) for r in rows])
        for t in thresholds
    ]
    cells = [[col[1][i] for col in columns] for i in range(len(rows))]
    pages = max(1, math.ceil(total / per_page))
    first = (query.page - 1) * per_page + 1 if total else 0
    return render(
        request,
        "worklist.html",
        user=user,
        nav="worklist",
        query=query,
        rows=list(zip(rows, cells, strict=True)),
        thresholds=thresholds,
        total=total,
        page=query.page,
        pages=pages,
        first=first,
        last=min(total, query.page * per_page),
        back=urlencode({"back": f"/?{query.query_string()}"}),
        calling_aets=crud.calling_aets(session),
        score_keys=crud.score_keys(session, thresholds=thresholds),
    )
