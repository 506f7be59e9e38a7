"""Pass options, the registry, the pipeline spec language, TOML configs, error naming."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import onnx
import pytest

from onnxcompress.errors import DataError, OptionError, PassError
from onnxcompress.model import load_model
from onnxcompress.passes import Canonicalize
from onnxcompress.pipeline import Pass, PassContext, PassResult, Pipeline, describe_options, parse_options
from onnxcompress.registry import REGISTRY, build_pipeline, load_config, parse_spec

from .conftest import FIXTURES


@dataclass(frozen=True)
class DemoOptions:
    ratio: float = field(default=0.5, metadata={"help": "a ratio"})
    count: int = 3
    flag: bool = False
    method: Literal["kl", "minmax"] = "kl"
    name: str | None = None

    def check(self) -> None:
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")


def test_parse_options_converts_strings() -> None:
    o = parse_options("demo", DemoOptions, {"ratio": "0.3", "count": "7", "flag": "yes", "method": "minmax", "name": "a"})
    assert o == DemoOptions(0.3, 7, True, "minmax", "a")


def test_parse_options_takes_typed_values() -> None:
    o = parse_options("demo", DemoOptions, {"ratio": 0, "count": 2, "flag": True, "name": None})
    assert o.ratio == 0.0 and isinstance(o.ratio, float) and o.count == 2 and o.flag is True and o.name is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"ratoi": "0.3"}, "pass 'demo': unknown option 'ratoi'; valid options: count, flag, method, name, ratio"),
        ({"count": "2.5"}, "pass 'demo', option 'count': '2.5' is not an integer"),
        ({"count": True}, "option 'count': True is not an integer"),
        ({"flag": "maybe"}, "option 'flag': 'maybe' is not a boolean"),
        ({"method": "entropy"}, "option 'method': 'entropy' is not one of kl, minmax"),
        ({"ratio": "high"}, "option 'ratio': 'high' is not a number"),
        ({"ratio": "1.5"}, "pass 'demo': ratio must be in \\[0, 1\\), got 1.5"),
    ],
)
def test_parse_options_errors(raw: dict, message: str) -> None:
    class Demo(Pass):
        name = "demo"
        summary = "demo"
        Options = DemoOptions

        def run(self, model, ctx):  # type: ignore[no-untyped-def]
            return PassResult(model, False)

    with pytest.raises(OptionError, match=message):  # types when parsed, constraints where the pass is made
        Demo.from_mapping(raw)


def test_describe_options() -> None:
    infos = {o.name: o for o in describe_options(DemoOptions)}
    assert infos["ratio"].type_name == "float" and infos["ratio"].help == "a ratio"
    assert infos["method"].type_name == "kl|minmax"


def test_parse_spec() -> None:
    assert parse_spec("prune:ratio=0.3,global=true,int8:method=kl") == [
        ("prune", {"ratio": "0.3", "global": "true"}),
        ("int8", {"method": "kl"}),
    ]
    assert parse_spec("a:x=1:y=2; b") == [("a", {"x": "1", "y": "2"}), ("b", {})]
    with pytest.raises(OptionError, match="comes before any pass name"):
        parse_spec("ratio=0.3")
    with pytest.raises(OptionError, match="is not option=value"):
        parse_spec("canonicalize:constants")
    with pytest.raises(OptionError, match="names no pass"):
        parse_spec(" , ")


def test_parse_spec_list_values() -> None:
    # list-valued (string) options keep their commas; a quoted value keeps , and ;
    assert parse_spec("canonicalize,int8:exclude=Sigmoid,Mul,max_drop=0.01,lowrank") == [
        ("canonicalize", {}), ("int8", {"exclude": "Sigmoid,Mul", "max_drop": "0.01"}), ("lowrank", {})]
    assert parse_spec("int8:guard_batches=1,8") == [("int8", {"guard_batches": "1,8"})]
    assert parse_spec("int8:exclude=Sigmoid,Mul:max_drop=0") == [("int8", {"exclude": "Sigmoid,Mul", "max_drop": "0"})]
    assert parse_spec("prune:overrides='Conv_1=0.5;Conv_2=0.3',ratio=0.2;int8") == [
        ("prune", {"overrides": "Conv_1=0.5;Conv_2=0.3", "ratio": "0.2"}), ("int8", {})]
    # after a non-string option a bare token is still a pass name (and an unknown one fails)
    assert parse_spec("prune:ratio=0.3,int9") == [("prune", {"ratio": "0.3"}), ("int9", {})]
    with pytest.raises(OptionError, match="unbalanced"):
        parse_spec("prune:overrides='a=0.5")
    p = build_pipeline("int8:exclude=Sigmoid,Mul,guard_batches=1,8")
    assert p.passes[-1].options.exclude == "Sigmoid,Mul" and p.passes[-1].options.guard_batches == "1,8"


def test_unknown_pass_lists_valid_ones() -> None:
    with pytest.raises(OptionError, match="unknown pass 'prun'; valid passes: " + ", ".join(sorted(REGISTRY))):
        build_pipeline("prun:ratio=0.3")


def test_canonicalize_always_first() -> None:
    p = build_pipeline("canonicalize:infer_shapes=false")
    assert [x.name for x in p.passes] == ["canonicalize"] and p.passes[0].options.infer_shapes is False
    assert [x.name for x in build_pipeline(None).passes] == ["canonicalize"]
    with pytest.raises(OptionError, match="more than once"):
        build_pipeline("canonicalize,canonicalize")


def test_toml_config(tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text('[[passes]]\nname = "canonicalize"\ninfer_shapes = false\nexperimental.dedupe = false\n')
    p = build_pipeline(load_config(cfg))
    assert p.passes[0].options.infer_shapes is False and p.passes[0].options.dedupe is False
    cfg.write_text('[[passes]]\nname = "canonicalize"\ndedupe = false\n')
    with pytest.raises(OptionError, match="'dedupe' is experimental: write experimental.dedupe=False"):
        build_pipeline(load_config(cfg))
    cfg.write_text('[[passes]]\nname = "canonicalize"\ninfer_shapes = "sometimes"\n')
    with pytest.raises(OptionError, match="'sometimes' is not a boolean"):
        build_pipeline(load_config(cfg))
    cfg.write_text("[[passes]]\nratio = 0.3\n")
    with pytest.raises(OptionError, match="entry 1 has no 'name'"):
        load_config(cfg)
    cfg.write_text("[pass]\nname='x'\n")
    with pytest.raises(OptionError, match="unknown top-level key"):
        load_config(cfg)
    cfg.write_text("[[passes]\n")
    with pytest.raises(OptionError, match="not valid TOML"):
        load_config(cfg)
    with pytest.raises(OptionError, match="no such config file"):
        load_config(tmp_path / "missing.toml")


class _Failing(Pass):
    name = "failing"
    summary = "fails"

    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        raise self.exc


class _Counting(Pass):
    name = "counting"
    summary = "adds a doc string"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        model.doc_string = "seen"
        return PassResult(model, True, {"nodes": len(model.graph.node)})


def test_pipeline_reports_per_pass() -> None:
    m = load_model(FIXTURES / "resnet_block.onnx")
    out, reports = Pipeline([Canonicalize(), _Counting()]).run(m)
    assert [r.name for r in reports] == ["canonicalize", "counting"]
    assert reports[1].modified and reports[1].stats == {"nodes": len(out.graph.node)} and out.doc_string == "seen"
    assert reports[0].options["infer_shapes"] is True and reports[0].seconds >= 0


def test_pipeline_names_the_failing_pass() -> None:
    m = load_model(FIXTURES / "resnet_block.onnx")
    with pytest.raises(PassError, match="pass 'failing': internal error: ZeroDivisionError: boom") as info:
        Pipeline([_Failing(ZeroDivisionError("boom"))]).run(m)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    with pytest.raises(PassError, match="pass 'failing': bad data") as info2:
        Pipeline([_Failing(DataError("bad data"))]).run(m)
    assert info2.value.exit_code == 2


def test_pass_options_type_checked() -> None:
    with pytest.raises(OptionError, match="options must be CanonicalizeOptions"):
        Canonicalize(DemoOptions())  # type: ignore[arg-type]


def test_experimental_options_live_in_their_namespace() -> None:
    """Research toggles and tuning knobs are set as ``experimental.NAME``; the plain name is
    refused with the spelling to use, and an unknown option's error lists only the
    options users need, with a count of the experimental ones."""
    (p,) = build_pipeline("int8:experimental.refit=true,max_drop=0.01").passes[1:]
    assert p.options.refit is True and p.options.max_drop == 0.01
    with pytest.raises(OptionError, match="'refit' is experimental: write experimental.refit=true"):
        build_pipeline("int8:refit=true")
    with pytest.raises(OptionError) as err:
        build_pipeline("int8:nonsense=1")
    assert "max_drop" in str(err.value) and "head_correction" not in str(err.value)
    assert "experimental ones: onnxcompress passes --all" in str(err.value)
    with pytest.raises(OptionError, match="unknown option 'experimental.max_drop'"):
        build_pipeline("int8:experimental.max_drop=0.1")


def test_at_most_40_options_are_shown_and_every_option_is_named_in_a_test() -> None:
    """The issue's bounds on the option surface: ``onnxcompress passes`` (without --all)
    lists at most 40 options; every option of every pass and of the search appears by
    name in some test other than this one."""
    import dataclasses
    import re

    from onnxcompress.pipeline import describe_options
    from onnxcompress.registry import REGISTRY
    from onnxcompress.search import SearchOptions

    shown = [o for cls in REGISTRY.values() for o in describe_options(cls.Options) if not o.experimental]
    assert len(shown) <= 40
    here = Path(__file__)
    tests = "\n".join(p.read_text() for p in here.parent.glob("test_*.py") if p != here)
    names = [o.name.removeprefix("experimental.") for cls in REGISTRY.values() for o in describe_options(cls.Options)]
    names += [f.name for f in dataclasses.fields(SearchOptions)]
    missing = sorted({n for n in names if not re.search(rf"\b{re.escape(n)}\b", tests)})
    assert not missing, missing


def test_options_and_context_are_checked_before_any_pass_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """One validation point per options class (its ``check``, run where the pass is made,
    from a spec or in Python), and every pass's needs are asked before the first runs."""
    from onnxcompress.passes.int8 import Int8, Int8Options

    with pytest.raises(OptionError, match="pass 'int8': percentile=0.0 must be in"):
        Int8(Int8Options(percentile=0.0))
    with pytest.raises(OptionError, match="pass 'int8': guard_batches='1,x' is not a list of integers"):
        build_pipeline("canonicalize,int8:guard_batches='1,x'")
    with pytest.raises(OptionError, match="exclude pattern"):
        build_pipeline("int8:exclude=Conv(")
    ran: list[str] = []
    monkeypatch.setattr(Canonicalize, "run", lambda self, m, ctx: ran.append("canonicalize"))
    with pytest.raises(OptionError, match="needs calibration data"):
        build_pipeline("canonicalize,prune:recovery=lstsq").run(load_model(FIXTURES / "resnet_block.onnx"), PassContext())
    with pytest.raises(OptionError, match="needs calibration data"):
        build_pipeline("canonicalize,int8").run(load_model(FIXTURES / "resnet_block.onnx"), PassContext())
    assert ran == []
