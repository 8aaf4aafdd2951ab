"""scripts/bench/bench_study.py's arithmetic: a stage's floor is its largest bound, and the stage fits recover a
line through the measured sizes and evaluate it at the study's defaults."""
from __future__ import annotations

import pytest

from scripts.bench import bench_study


def rates() -> dict:
    return {"matmul_flops_per_s": 1e12, "copy_bytes_per_s": 1e9,
            "files": {"out-dir": {"write": {"bytes_per_s": 1e8}, "read": {"bytes_per_s": 4e8}}}}


def test_the_floor_is_the_largest_bound_and_collect_is_bound_by_writing():
    work = {"flops": 3e12, "device_bytes": 2e9, "file_bytes": 5e8}
    summary = bench_study.stage_floor("summary", work, rates(), "out-dir")
    assert summary["floor_s"] == pytest.approx(3.0) and summary["bound"] == "flops / matmul peak"
    collect = bench_study.stage_floor("collect", work, rates(), "out-dir")
    assert collect["floor_s"] == pytest.approx(5.0) and collect["bound"].startswith("file bytes / out-dir write")


def test_fits_recover_the_line_through_two_sizes_and_evaluate_it_at_the_defaults():
    sizes = {name: {"drivers": bench_study.drivers(bench_study.study_sizes(scale, limit)),
                    "settings": {"m": {"tasks": 9}}}
             for name, scale, limit in (("small", 0.025, 5), ("large", 0.05, 10))}
    line = {"summary": (4.0, 0.001), "tasks": (2.0, 0.5)}
    tables = {name: [{"model": "m", "stage": stage, "seconds": a + b * sizes[name]["drivers"][stage]}
                     for stage, (a, b) in line.items()] + [{"model": "m", "stage": "convert", "seconds": 10.0 + i},
                                                           {"model": "all", "stage": "tasks", "seconds": 1.0 + i}]
              for i, name in enumerate(sizes)}
    fits = {f["stage"]: f for f in bench_study.fit_stages(tables, sizes) if f["model"] == "m"}
    default = bench_study.drivers(bench_study.study_sizes(1.0, None))
    for stage, (a, b) in line.items():
        assert fits[stage]["a_s"] == pytest.approx(a) and fits[stage]["b_s_per_unit"] == pytest.approx(b)
        assert fits[stage]["default_s"] == pytest.approx(a + b * default[stage])
    assert fits["convert"]["default_s"] == pytest.approx(10.5) and fits["convert"]["b_s_per_unit"] == 0
    assert fits["tasks"]["settings"] == 9
    [local_tasks] = [f for f in bench_study.fit_stages(tables, sizes) if f["model"] == "all"]
    assert local_tasks["b_s_per_unit"] == 0 and local_tasks["default_s"] == pytest.approx(1.5)  # no driver
