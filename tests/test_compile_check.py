"""The compile check's own logic (kvpress_kernels/compile_check.py): PTX and ptxas parsing, attribution
of accesses to source arrays, the rules, and discovery (a kernel no case launches fails the check).

The compilation itself runs in CI (`make compile-check`, minutes); here only what is cheap. Discovery
needs real JIT functions, so it runs in a subprocess without TRITON_INTERPRET (the interpreter, which
the rest of the suite uses, replaces the kernels)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from kvpress_kernels import compile_check as CC

REPO = Path(__file__).resolve().parent.parent

PTX = """
	.loc	1 10 5
	mov.u32 %r1, 0x0;
	@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
	.loc	1 11 5
	@%p2 st.global.b16 [ %rd2 + 0 ], { %rs1 };
	.loc	1 12 7
	ld.global.L1::evict_last.v2.b64 { %rd5, %rd6 }, [ %rd3 + 0 ];
	cp.async.cg.shared.global [ %r9 + 0 ], [ %rd4 + 0 ], 0x10, %r8;
	@!%p3 st.global.v2.b32 [ %rd7 + 0 ], { %r5, %r6 };
	.file	1 "/x/kern.py"
"""


def test_ptx_accesses_widths_and_lines():
    acc = CC.ptx_accesses(PTX)
    assert acc == [("ld", 16, "/x/kern.py", 10), ("st", 2, "/x/kern.py", 11), ("ld", 16, "/x/kern.py", 12),
                   ("ld", 16, "/x/kern.py", 12), ("st", 8, "/x/kern.py", 12)]


def test_parse_ptxas():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 464 bytes cmem[0]\n")
    assert CC.parse_ptxas(log) == dict(regs=255, stack=24, spill_stores=8, spill_loads=12)


def test_attribution_to_source_arrays(tmp_path):
    src = tmp_path / "k.py"
    src.write_text(textwrap.dedent("""\
        def kern(k_pages, out, idx):
            off = tl.load(idx + 3)
            ptr = k_pages + off
            x = tl.load(ptr,
                        mask=None)
            tl.store(out + off, x)
        """))
    calls = CC.SourceCalls.parse(str(src))
    assert "idx" in calls.names_at(2, "ld") and "k_pages" not in calls.names_at(2, "ld")
    assert "k_pages" in calls.names_at(5, "ld")           # inside a call spanning two lines, through `ptr`
    assert "out" in calls.names_at(6, "st") and "k_pages" not in calls.names_at(6, "st")
    assert "k_pages" in calls.names_at(6, "ld")           # a load scheduled under the store's line
    ptx = f"\t.loc 1 4 9\n\t@%p1 ld.global.b32 {{ %r1 }}, [ %rd1 + 0 ];\n\t.file 1 \"{src}\"\n"
    assert CC.access_widths(ptx, ("k_pages", "out")) == {"k_pages": {"ld": 4}}


def _variant(dtype="fp16", D=128, regs=64, spills=0, widths=None, ok=True):
    v = CC.Variant("_k", "op", 90, dtype, D, ["x"], "cfg")
    v.result = dict(ok=ok, regs=regs, stack=0, spill_stores=spills, spill_loads=0, shared=0,
                    widths=widths or {}, error="boom")
    return v


def test_rules():
    copy = CC.Role(kv=("k_pages",), memory_bound=True)
    assert CC.judge(_variant(widths={"k_pages": {"ld": 16, "st": 16}}), copy) == []
    assert CC.judge(_variant(ok=False), copy) == ["compile error: boom"]
    assert CC.judge(_variant(spills=8), CC.Role()) == ["spills 8 B stores / 0 B loads"]
    assert CC.judge(_variant(regs=129), copy) == ["129 registers > 128 in a memory-bound kernel"]
    assert CC.judge(_variant(regs=200), CC.Role(kv=("k_pages",))) == []        # compute kernels may use more
    assert CC.judge(_variant(widths={"k_pages": {"st": 8}}), copy) == ["k_pages st 8 B < 16 B"]
    assert CC.judge(_variant("bf16", widths={"k_pages": {"ld": 4}}), copy) == ["k_pages ld 4 B < 16 B"]
    assert CC.judge(_variant("fp32", widths={"k_pages": {"ld": 4}}), copy) == []  # the rule is fp16/bf16
    assert CC.judge(_variant(D=100, widths={"k_pages": {"ld": 8}}), copy) == []  # D % 8 != 0


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


def test_every_kernel_has_a_role_and_a_case_and_a_new_one_fails(tmp_path):
    # A package with one more kernel, unknown to the cases: the check must report it missing.
    pkg = tmp_path / "extra_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "newop.py").write_text(textwrap.dedent("""\
        import triton
        import triton.language as tl

        @triton.jit
        def _helper(x):
            return x + 1

        @triton.jit
        def _new_kernel(ptr, BLOCK: tl.constexpr):
            tl.store(ptr + tl.arange(0, BLOCK), _helper(tl.arange(0, BLOCK)))
        """))
    code = textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from pathlib import Path
        from kvpress_kernels import compile_check as CC
        kernels, helpers = CC.discover_kernels()
        assert set(kernels) == set(CC.ROLES), (sorted(kernels), sorted(CC.ROLES))
        assert "_load_k_tile" in helpers and "_load_k_tile" not in kernels
        cases = CC._cases()
        variants, jobs, missing = CC.build_variants(kernels, cases, archs=(90,))
        assert missing == [], missing
        assert {{v.kernel for v in variants}} == set(kernels)
        extra, extra_helpers = CC.discover_kernels(Path({str(pkg)!r}), "extra_pkg")
        assert set(extra) == {{"_new_kernel"}} and set(extra_helpers) == {{"_helper"}}
        _, _, missing = CC.build_variants({{**kernels, **extra}}, cases, archs=(90,))
        assert missing == ["_new_kernel"], missing
        rep = dict(missing=missing, variants=[])
        assert CC.problems_text(rep) == ["MISSING: kernel _new_kernel is launched by no case in "
                                         "kvpress_kernels/compile_check.py"]
        print("ok", len(variants), len(jobs))
        """)
    r = _run(code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_cli_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "kvpress_kernels.cli", "compile-check", "--arch", "90"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "unset TRITON_INTERPRET" in r.stderr


def test_copy_views_and_tiles_aim_at_16_byte_vectors():
    import torch

    from kvpress_kernels.ops.compaction import copy_tile, wide_bits

    # Widest integer view whose rows keep 16-element-divisible strides (what lets Triton prove alignment).
    assert wide_bits(torch.zeros(4, 16, 128, dtype=torch.float16)).dtype == torch.int64
    assert wide_bits(torch.zeros(4, 16, 96, dtype=torch.float16)).dtype == torch.int32   # int64 rows: 24
    assert wide_bits(torch.zeros(4, 16, 96, dtype=torch.float32)).dtype == torch.int64
    assert wide_bits(torch.zeros(4, 16, 7, dtype=torch.float16)).dtype == torch.int16    # nothing wider is legal
    assert wide_bits(torch.zeros(4, 16, 128, dtype=torch.float16), max_width=4).dtype == torch.int32
    # (tokens, BLOCK_D, EVEN_D, warps): a decode step's single token still fills 16 bytes per thread.
    assert copy_tile(1, 32, 32, 8) == (2, 32, True, 1)
    assert copy_tile(37, 32, 32, 8) == (32, 32, True, 4)
    assert copy_tile(3000, 48, 48, 4) == (128, 16, True, 4)      # fp16 D = 96 as int32: 16 | 48, 64 B steps
    assert copy_tile(5, 7, 7, 2) == (32, 8, False, 1)              # odd rows: masked tail, 512 B tile
