"""Quality lever measured, not adopted: the price of a GQA group against MLP channels in the per-parameter split.

``--unit_split per_param`` ranks a layer's GQA groups and MLP channels together by Taylor score per parameter.
This script multiplies every group's score by ``--gamma`` before that ranking (gamma < 1: groups look cheaper and
more of them go; gamma > 1: fewer go) and runs the quality benchmark's gaqprune row, so the same plan machinery,
windows and evaluation as ``quality.py``:

    python benchmarks/lever_group_cost.py --gamma 0.5 --importance_cache benchmarks/quality_importance_removal50.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402

from gaqprune.core import plan as pruning  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gamma", type=float, required=True, help="factor on every GQA group's Taylor score")
    args, rest = parser.parse_known_args(argv)
    select_units = pruning.select_units

    def priced(attn_scores, mlp_scores, *more, **kw):
        return select_units(attn_scores * args.gamma, mlp_scores, *more, **kw)

    pruning.select_units = priced  # build_plan looks it up in its module at call time
    try:
        return quality.main(["--methods", "gaqprune", *rest])
    finally:
        pruning.select_units = select_units


if __name__ == "__main__":
    main()
