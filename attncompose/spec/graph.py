"""Recipe -> networkx DiGraph of its steps, with the structural checks.

Nodes are step ids (attributes: ``op``, ``step`` model, ``produces``); an edge ``a -> b``
with attribute ``port`` says step ``b`` reads ``a`` through that port; ``graph["output"]``
names the output step. A recipe builds its graph once, when it is validated
(:attr:`~attncompose.spec.recipe.RecipeBase.graph`). Imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import networkx as nx

from attncompose.spec.errors import RecipeError
from attncompose.spec.knobs import is_tunable
from attncompose.spec.steps import STEP_TYPES

if TYPE_CHECKING:
    from attncompose.spec.recipe import RecipeBase


def build_graph(recipe: RecipeBase) -> nx.DiGraph:
    """The recipe's DAG (no checks beyond what constructing the edges needs)."""
    g = nx.DiGraph(name=recipe.name)
    for sid, step in recipe.steps.items():
        g.add_node(sid, op=step.op, step=step, produces=type(step).produces)
    for sid, step in recipe.steps.items():
        for port in type(step).ports:
            for src in step.port_names(port):
                if src in recipe.steps:
                    g.add_edge(src, sid, port=port)
    return g


def check_structure(recipe: RecipeBase) -> nx.DiGraph:
    """The recipe's graph, with its output step in ``graph["output"]``; RecipeError for
    dangling names, wrong input kinds, cycles or several outputs."""
    for sid, step in recipe.steps.items():
        _check_ports(recipe, sid, step)
    g = build_graph(recipe)
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        path = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
        raise RecipeError(f"the steps form a cycle: {path}", loc="steps")
    _check_disjoint(recipe)
    g.graph["output"] = output_step(recipe, g)
    return g


def _check_ports(recipe: RecipeBase, sid: str, step) -> None:
    for port, spec in type(step).ports.items():
        names = step.port_names(port)
        loc = f"steps.{sid}.{port}"
        if len(names) < spec.min_count:
            raise RecipeError(f"needs at least {spec.min_count} step(s)", loc=loc)
        if spec.max_count is not None and len(names) > spec.max_count:
            raise RecipeError(f"takes at most {spec.max_count} step(s)", loc=loc)
        if len(set(names)) != len(names):
            raise RecipeError("names the same step twice", loc=loc)
        for src in names:
            if src not in recipe.steps:
                known = ", ".join(s for s in recipe.steps if s != sid)
                raise RecipeError(f"names unknown step {src!r} (steps: {known})", loc=loc)
            if src == sid:
                raise RecipeError("a step cannot read itself", loc=loc)
            src_type = type(recipe.steps[src])
            if src_type.produces not in spec.kinds:
                raise RecipeError(
                    f"step {src!r} ({src_type.op_name()}) produces a "
                    f"{src_type.produces}, but this port takes a {' or '.join(spec.kinds)}",
                    loc=loc,
                )
            if spec.needs_coverage and not src_type.provides_coverage:
                ops = ", ".join(op for op, t in STEP_TYPES.items() if t.provides_coverage)
                raise RecipeError(
                    f"step {src!r} does not record the pairs it covered; name a step of op {ops}",
                    loc=loc,
                )


def _check_disjoint(recipe: RecipeBase) -> None:
    """Partials combined by a step (a merge's inputs) must attend to disjoint keys, or their
    mass is counted twice. Provably disjoint: one excludes the other (a port that skips the
    pairs another step covered), or, for a combination, each of its parts is."""
    for sid, step in recipe.steps.items():
        for port, spec in type(step).ports.items():
            if not spec.disjoint:
                continue
            names = step.port_names(port)
            for i, a in enumerate(names):
                for b in names[i + 1 :]:
                    clash = _overlap(recipe, a, b)
                    if clash is not None:
                        raise RecipeError(
                            f"{clash[0]!r} and {clash[1]!r} may attend to the same keys, whose "
                            f"mass would be counted twice; {_disjoint_hint(recipe, *clash)}",
                            loc=f"steps.{sid}.{port}",
                        )


def _overlap(recipe: RecipeBase, a: str, b: str) -> tuple[str, str] | None:
    """None if steps ``a`` and ``b`` provably attend to disjoint keys, else two steps that
    may share keys (``a`` or one of its parts, ``b`` or one of its parts)."""
    for part in _ports_where(recipe, a, "disjoint"):
        clash = _overlap(recipe, part, b)
        if clash is not None:
            return clash
    if _ports_where(recipe, a, "disjoint"):
        return None
    for part in _ports_where(recipe, b, "disjoint"):
        clash = _overlap(recipe, a, part)
        if clash is not None:
            return clash
    if _ports_where(recipe, b, "disjoint"):
        return None
    if b in _ports_where(recipe, a, "needs_coverage"):
        return None
    if a in _ports_where(recipe, b, "needs_coverage"):
        return None
    return (a, b)


def _ports_where(recipe: RecipeBase, sid: str, flag: str) -> list[str]:
    """Steps wired into the ports of step ``sid`` whose :class:`Port` has ``flag`` set."""
    step = recipe.steps[sid]
    ports = [port for port, spec in type(step).ports.items() if getattr(spec, flag)]
    return [name for port in ports for name in step.port_names(port)]


def _disjoint_hint(recipe: RecipeBase, a: str, b: str) -> str:
    """How to make ``a`` and ``b`` disjoint: one skipping the pairs the other covered."""
    for covered, skipper in ((a, b), (b, a)):
        step = recipe.steps[skipper]
        ports = [p for p, spec in type(step).ports.items() if spec.needs_coverage]
        if type(recipe.steps[covered]).provides_coverage and ports:
            return f"add `{ports[0]}: [{covered}]` to {skipper!r}"
    return "merge only partials that skip each other's pairs (through an exclude port)"


def output_step(recipe: RecipeBase, g: nx.DiGraph) -> str:
    """The single step whose result is the output; RecipeError if there is not exactly one."""
    sinks = [n for n in g.nodes if g.out_degree(n) == 0]
    if recipe.output is not None:
        if recipe.output not in recipe.steps:
            raise RecipeError(f"names unknown step {recipe.output!r}", loc="output")
        unused = [n for n in sinks if n != recipe.output]
        if unused:
            raise RecipeError(
                f"steps {unused} are not used by the output {recipe.output!r}", loc="steps"
            )
        out = recipe.output
    elif len(sinks) != 1:
        raise RecipeError(
            f"the recipe has {len(sinks)} outputs ({', '.join(sinks)}); exactly one step may be "
            "left unread, or set `output:` and use every other step",
            loc="steps",
        )
    else:
        out = sinks[0]
    produces = type(recipe.steps[out]).produces
    if produces != "partial":
        raise RecipeError(
            f"the output step {out!r} produces a {produces}; it must compute attention "
            "(a block, merge, exact, ... step)",
            loc="output" if recipe.output else "steps",
        )
    return out


def describe(recipe: RecipeBase, kernels: dict[str, str] | None = None) -> str:
    """Human-readable listing: nodes in execution order with knobs, inputs and kernels."""
    g = recipe.graph
    lines = [f"recipe {recipe.name}: {g.number_of_nodes()} steps, output {recipe.output_id}"]
    for sid in nx.topological_sort(g):
        step = recipe.steps[sid]
        knobs = ", ".join(f"{k}={_fmt(v)}" for k, v in step.knob_fields().items())
        ins = "; ".join(
            f"{p}<-{','.join(step.port_names(p))}" for p in type(step).ports if step.port_names(p)
        )
        kernel = f"  [{kernels[sid]}]" if kernels and sid in kernels else ""
        lines.append(
            f"  {sid}: {step.op}({knobs}) -> {type(step).produces}"
            f"{'  ' + ins if ins else ''}{kernel}"
        )
    return "\n".join(lines)


def to_dot(recipe: RecipeBase) -> str:
    """Graphviz DOT text of the recipe graph."""
    g = recipe.graph
    out = [f'digraph "{recipe.name}" {{', "  rankdir=LR;"]
    for sid in g.nodes:
        step = recipe.steps[sid]
        knobs = "\\n".join(f"{k}={_fmt(v)}" for k, v in step.knob_fields().items())
        shape = "ellipse" if type(step).produces == "selection" else "box"
        label = f"{sid}\\n{step.op}" + (f"\\n{knobs}" if knobs else "")
        out.append(f'  "{sid}" [label="{label}", shape={shape}];')
    for u, v, data in g.edges(data=True):
        out.append(f'  "{u}" -> "{v}" [label="{data["port"]}"];')
    out.append("}")
    return "\n".join(out)


def _fmt(value) -> str:
    if not is_tunable(value):
        return str(value)
    if hasattr(value, "choices"):
        return f"{value.default} in {value.choices}"
    return f"{value.default} in [{value.low}, {value.high}]"
