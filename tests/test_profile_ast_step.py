"""The HLO reading of ``benchmarks/profile_ast_step.py``: which thunk is a product, and its FLOP count.

The text below has the layout XLA:CPU writes to ``*cpu_after_optimizations.txt`` (cut from a real dump of the
AST step): one fused product called by a ``ynn_fusion`` and one plain ``dot`` in the entry computation.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("profile_step", ROOT / "benchmarks" / "profile_ast_step.py")
prof = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prof)

HLO = """HloModule jit_step, entry_computation_layout={()->f32[]}

%fused_computation.64 (param_0.96: f32[2048,256], param_1.96: f32[256,256]) -> f32[2048,256] {
  %param_0.96 = f32[2048,256]{1,0} parameter(0)
  %param_1.96 = f32[256,256]{1,0} parameter(1)
  ROOT %dot.190 = f32[2048,256]{1,0} dot(%param_0.96, %param_1.96), lhs_contracting_dims={1}, \
rhs_contracting_dims={1}, metadata={op_name="jit(step)/transpose(jvp(GPT2))/block_0/attn/q/dot_general"}
}

ENTRY %main.1 (a: f32[2048,256], b: f32[256,256], c: f32[16,4,128,64], d: f32[16,4,64,128]) -> f32[] {
  %a = f32[2048,256]{1,0} parameter(0)
  %b = f32[256,256]{1,0} parameter(1)
  %c = f32[16,4,128,64]{3,2,1,0} parameter(2)
  %d = f32[16,4,64,128]{3,2,1,0} parameter(3)
  %ynn_fusion.64 = f32[2048,256]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.64
  %dot.90 = f32[16,4,128,128]{3,2,1,0} dot(%c, %d), lhs_batch_dims={0,1}, lhs_contracting_dims={3}, \
rhs_batch_dims={0,1}, rhs_contracting_dims={2}, metadata={op_name="jit(step)/GPT2/block_0/attn/dot_general"}
  %copy.5 = f32[256,2048]{1,0} copy(%a)
  ROOT %r = f32[] constant(0)
}
"""


@pytest.fixture()
def tables(tmp_path):
    path = tmp_path / "module.txt"
    path.write_text(HLO)
    return prof._hlo_tables(str(path))


def test_fused_product_is_found_through_its_called_computation(tables):
    assert tables["calls"]["ynn_fusion.64"] == "fused_computation.64"
    assert tables["shapes"]["param_0.96"] == "f32[2048,256]{1,0}"
    desc, gflop = prof._dot_of(tables["comps"]["fused_computation.64"], tables["shapes"])
    # out 2048x256, contracted over 256: 2 * 2048 * 256 * 256 FLOP
    assert gflop == pytest.approx(2 * 2048 * 256 * 256 / 1e9, rel=1e-12)
    assert "transpose(jvp(GPT2))/block_0/attn/q" in desc and "jit(step)" not in desc


def test_plain_batched_product_counts_batch_and_contracted_dims(tables):
    desc, gflop = prof._dot_of([tables["lines"]["dot.90"]], tables["shapes"])
    # out 16x4x128x128, contracted over lhs dim 3 (64)
    assert gflop == pytest.approx(2 * 16 * 4 * 128 * 128 * 64 / 1e9, rel=1e-12)
    assert "GPT2/block_0/attn" in desc


def test_a_copy_is_not_a_product(tables):
    assert prof._dot_of([tables["lines"]["copy.5"]], tables["shapes"]) is None
