"""The bundle's ``required_operators.config``: the operators a custom minimal ONNX Runtime build must hold.

ONNX Runtime Mobile's minimal builds keep only the kernels a config names
(``build.sh --minimal_build --include_ops_by_config required_operators.config``). ONNX Runtime's
own tool writes it (``onnxruntime.tools.ort_format_model.create_config_from_models``, what
``convert_onnx_models_to_ort`` runs) from ORT-format graphs, so it lists the operators of the
*optimized* graphs the phone runs: fused com.microsoft operators in place of those they fuse.

Its graphs are every graph the phone may run in ONNX Runtime: the bundle's ``.ort`` copies, and the
on-device training graphs, which the bundle holds as ``.onnx`` only; those are converted to ORT
format (as the ``.ort`` copies are) in a scratch folder for the list and not shipped. No type
reduction (``required_operators_and_types.config``): every user's adapter and every graph of the
bundle must run on the one build, and ONNX Runtime's tool can write it from the ``.ort`` files.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from export.bundle_verify import REQUIRED_OPERATORS_FILE
from export.errors import ExportError
from export.ort_format import convert_to_ort

logger = logging.getLogger(__name__)

HEADER = "# Operators of the bundle's graphs, for ONNX Runtime's --include_ops_by_config; written from:\n"


def write_required_operators(
    folder: Path, ort_graphs: Sequence[str], onnx_graphs: Sequence[str] = ()
) -> dict[str, Any]:
    """Write ``folder / required_operators.config`` for the bundle's ``ort_graphs`` and ``onnx_graphs``.

    Both are paths relative to ``folder``; ``onnx_graphs`` are converted to ORT format in a scratch
    folder first. Returns the report's section: the file, the graphs it covers and how many operators.
    """
    from onnxruntime.tools.ort_format_model import create_config_from_models  # slow import: only with --ort

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # its INFO line names our scratch path
    graphs = [*ort_graphs, *onnx_graphs]
    with tempfile.TemporaryDirectory(prefix=".required-operators-", dir=folder) as scratch:
        models = [folder / name for name in ort_graphs]
        for index, name in enumerate(onnx_graphs):
            models.append(Path(scratch) / f"{index}.ort")
            convert_to_ort(folder / name, models[-1])
        generated = Path(scratch) / REQUIRED_OPERATORS_FILE
        try:
            create_config_from_models(models, generated, enable_type_reduction=False)
        except (ValueError, RuntimeError, OSError) as err:
            raise ExportError(f"ONNX Runtime could not list the operators of {graphs}: {err}") from err
        # The tool's comment lines name the files it read (here: the scratch folder's); name the bundle's instead.
        entries = [line for line in generated.read_text().splitlines(keepends=True) if not line.startswith("#")]
    sources = "".join(f"# - {name}\n" for name in graphs)
    target = folder / REQUIRED_OPERATORS_FILE
    target.write_text(HEADER + sources + "".join(entries))
    operators = count_operators(target)
    logger.info("wrote %s: %d operators of %d graphs", REQUIRED_OPERATORS_FILE, operators, len(graphs))
    return {"file": REQUIRED_OPERATORS_FILE, "graphs": graphs, "operators": operators, "type_reduction": False}


def count_operators(config: Path) -> int:
    """How many (domain, operator) pairs ``config`` names, read with the parser ONNX Runtime's build uses."""
    from onnxruntime.tools.reduced_build_config_parser import parse_config

    required, _ = parse_config(str(config))
    if not required:
        raise ExportError(f"{config.name} names no operator; ONNX Runtime's build would include none")
    return len({(domain, op) for domain, opsets in required.items() for ops in opsets.values() for op in ops})
