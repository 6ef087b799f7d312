"""The split engine: tracing, region algebra, tiles, plans and their execution."""
from meshdl.graph.model_graph import ModelGraph, RegionPlan, trace
from meshdl.graph.tiling import (check_plan, grid_regions, make_stage, manual_plan,
                                 row_regions, split_even, split_ratio, validate_tiles)
from meshdl.graph.execute import assemble, execute, run_task, stitch, task_input
from meshdl.graph.trace import Op

__all__ = ["ModelGraph", "RegionPlan", "trace", "Op", "check_plan", "grid_regions",
           "make_stage", "manual_plan", "row_regions", "split_even", "split_ratio",
           "validate_tiles", "assemble", "execute", "run_task", "stitch", "task_input"]
