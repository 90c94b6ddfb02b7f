"""Report which backends are usable and why any is not, with versions and onnxruntime providers.

With --device, also check that that one device is usable, as every command's --device does:
exit 2 with the reason when it is not, unless --allow-fallback (then CPU is reported).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
from typing import Any

from modelkin.commands import common
from modelkin.utils import human_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_json(parser)
    parser.add_argument("--device", default=None, help="also check that this device is usable (e.g. npu, cuda:1)")
    parser.add_argument("--allow-fallback", action="store_true", default=None,
                        help="with --device: report CPU instead of failing when the device is unusable")


def _onnxruntime() -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except Exception as err:  # not installed, or a broken provider package
        return {"version": None, "providers": [], "reason": f"cannot import onnxruntime: {err}"}
    return {"version": ort.__version__, "providers": list(ort.get_available_providers())}


def collect(device: str | None = None, allow_fallback: bool | None = None) -> dict[str, Any]:
    """Everything `doctor` reports, as a JSON-ready dict; raises DeviceError for an unusable --device."""
    import torch

    from modelkin import _torch_env
    from modelkin.backends import get_backend, probe_all

    statuses = probe_all()
    selected = get_backend("auto")
    report: dict[str, Any] = {
        "modelkin": importlib.metadata.version("modelkin") if _installed("modelkin") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "plugin_autoload_disabled": os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD") == "0",
            "npu_block_reason": _torch_env.blocked_npu_reason(),
        },
        "backends": [s.to_json() for s in statuses],
        "onnxruntime": _onnxruntime(),
        "selected": {"backend": selected.name, "device": str(selected.device),
                     "dtype": str(selected.resolve_dtype("auto")).removeprefix("torch.")},
    }
    if device is not None:
        backend = get_backend(device, allow_fallback=allow_fallback)
        report["device_check"] = {
            "requested": device, "usable": backend.fallback_reason is None,
            "backend": backend.name, "device": str(backend.device),
            "fallback_reason": backend.fallback_reason,
        }
    return report


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _print(report: dict[str, Any], args: argparse.Namespace) -> None:
    from rich.markup import escape
    from rich.table import Table

    con = common.console(args)
    con.print(f"modelkin {report['modelkin'] or '(not installed)'} · Python {report['python']} · "
              f"torch {report['torch']['version']}")
    table = Table("backend", "available", "devices / reason")
    for b in report["backends"]:
        if b["available"]:
            detail = "; ".join(
                f"{d.get('index') if d.get('index') is not None else ''} {d.get('name', '')}"
                f" {human_bytes(d['total_memory']) if d.get('total_memory') else ''}".strip()
                for d in b["devices"])
        else:
            detail = b["reason"]
        versions = ", ".join(f"{k} {v}" for k, v in b.get("versions", {}).items())
        table.add_row(b["name"], "yes" if b["available"] else "no",
                      escape(detail + (f" [{versions}]" if versions else "")))
    con.print(table)
    ort = report["onnxruntime"]
    con.print(escape(f"onnxruntime {ort['version'] or 'missing'}: providers {', '.join(ort['providers']) or '-'}"))
    sel = report["selected"]
    con.print(f"auto selects: {sel['device']} ({sel['dtype']})")
    check = report.get("device_check")
    if check:
        if check["usable"]:
            con.print(f"--device {check['requested']}: usable")
        else:
            con.print(escape(f"--device {check['requested']}: unusable, CPU will be used ({check['fallback_reason']})"))


def run(args: argparse.Namespace) -> int:
    report = collect(args.device, args.allow_fallback)
    common.emit_json(args, report)
    if not common.json_to_stdout(args) or sys.stderr.isatty():
        _print(report, args)
    return 0
