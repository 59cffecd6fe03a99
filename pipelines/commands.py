"""The pipelines' verbs: release (every stage chained into a folder to publish)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from tiblocal.options import Result, option

from .release import ReleaseOptions


@dataclass(frozen=True, kw_only=True)
class ReleaseCommand(ReleaseOptions):
    as_json: bool = option(False, flag="--json", help="print the result as JSON")


def release(o: ReleaseCommand) -> Result:
    from tiblocal.progress import status

    from .release import release as make_release

    given = ReleaseOptions(**{f.name: getattr(o, f.name) for f in fields(ReleaseOptions)})
    with status("releasing") as say:
        r = make_release(given, progress=say)
    return Result({"out": str(r.out), "files": r.files, "rows": r.rows}, f"wrote {r.out}: {', '.join(r.files)}",
                  to="stderr")
