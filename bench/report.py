"""Render the results of `bench.gateway` as Markdown."""

from __future__ import annotations

from typing import Any

from bench.stats import ratio

COLUMNS = ("direct", "tollbooth", "litellm")
NOT_MEASURED = "not measured"


def number(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def cell(results: dict[str, Any], name: str, value: float | None, digits: int = 2) -> str:
    if name in results.get("not_measured", {}):
        return NOT_MEASURED
    return number(value, digits)


def row(
    results: dict[str, Any],
    label: str,
    values: dict[str, float | None],
    *,
    digits: int = 2,
    ratios: bool = True,
    prefix: dict[str, str] | None = None,
    override: dict[str, str] | None = None,
) -> str:
    """Return one table row: the three targets, then Tollbooth ÷ direct and ÷ LiteLLM.

    `prefix` marks a figure that is only a lower bound (">= "); `override` replaces a
    figure, and the ratios that would use it, with a word.
    """
    prefix = prefix or {}
    override = override or {}
    cells = [
        override.get(name) or prefix.get(name, "") + cell(results, name, values.get(name), digits)
        for name in COLUMNS
    ]
    values = {name: None if name in override else value for name, value in values.items()}

    def divided(other: str) -> str:
        if not ratios:
            return ""
        text = times(ratio(values.get("tollbooth"), values.get(other)))
        bounded_above, bounded_below = "tollbooth" in prefix, other in prefix
        if text == "–" or not (bounded_above or bounded_below):
            return text
        # A lower bound divided by a figure is a lower bound, and the other way round.
        if bounded_above and bounded_below:
            return "–"
        return ("<= " if bounded_below else ">= ") + text

    return f"| {label} | " + " | ".join([*cells, divided("direct"), divided("litellm")]) + " |"


def pick(section: dict[str, Any], path: tuple[str, ...]) -> dict[str, float | None]:
    """Read one figure of every target from a results section."""
    out: dict[str, float | None] = {}
    for name in COLUMNS:
        value: Any = section.get(name)
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        out[name] = value
    return out


def markdown(results: dict[str, Any]) -> str:
    plan = results["plan"]
    request = results["request"]
    machine = results["machine"]
    kind = "smoke run (--quick)" if results["kind"] == "quick" else "full run"
    lines = [
        f"## Gateway benchmark, {kind}",
        "",
        f"{machine['cpu_model']}, {machine['nproc']} CPUs, {machine['memory_gib']} GiB, "
        f"Linux {machine['kernel']}; load average before the run "
        f"{', '.join(str(value) for value in results['load_average_before'])}, after "
        f"{', '.join(str(value) for value in results.get('load_average_after', []))}.",
        f"Model {request['model']}, {request['output_tokens']} output tokens "
        f"({request['stream_output_tokens']} for streams); worker processes per server: "
        f"{results['workers']}. Times in milliseconds. Added means the target's figure "
        "minus the direct target's. The last two columns divide Tollbooth's figure by "
        "the direct target's and by LiteLLM's.",
        "",
        "| Measure | direct | Tollbooth | LiteLLM | Tollbooth ÷ direct | Tollbooth ÷ LiteLLM |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    c1 = results["concurrency1"]
    streams = results["streams"]
    fixed = results["fixed_rate"]
    added = results["added"]
    n = plan["requests"]
    for q in ("p50", "p99"):
        lines.append(
            row(results, f"Concurrency 1, latency {q} ({n} requests)", pick(c1, ("latency", q)))
        )
    for q in ("p50", "p99"):
        lines.append(
            row(results, f"Concurrency 1, added latency {q}", pick(added["concurrency1"], (q,)))
        )
    n = plan["stream_requests"]
    for q in ("p50", "p99"):
        lines.append(
            row(
                results,
                f"Streams, time to first token {q} ({n} streams)",
                pick(streams, ("ttft", q)),
            )
        )
    for q in ("p50", "p99"):
        lines.append(
            row(
                results,
                f"Streams, added time to first token {q}",
                pick(added["streams_ttft"], (q,)),
            )
        )
    rate = f"{plan['fixed_rate']:g} req/s for {plan['fixed_seconds']:g} s"
    # A target that could not keep up was stopped early, so its percentiles are not comparable.
    overloaded = {
        name: f"overloaded (p99 > {plan['fixed_give_up_ms']:g} ms)"
        for name, entry in fixed.items()
        if entry.get("stopped_early")
    }
    added_overloaded = dict(overloaded)
    if "direct" in overloaded:
        added_overloaded = {name: "–" for name in COLUMNS}
    for q in ("p50", "p99"):
        lines.append(
            row(results, f"{rate}, latency {q}", pick(fixed, ("latency", q)), override=overloaded)
        )
    for q in ("p50", "p99"):
        lines.append(
            row(
                results,
                f"{rate}, added latency {q}",
                pick(added["fixed_rate"], (q,)),
                override=added_overloaded,
            )
        )
    lines.append(
        row(results, f"{rate}, failed requests", pick(fixed, ("errors",)), digits=0, ratios=False)
    )
    lines.append(
        row(
            results,
            f"{rate}, server CPU ms per request",
            pick(fixed, ("cpu_ms_per_request",)),
            digits=3,
            override=overloaded,
        )
    )
    lines.append(
        row(
            results,
            f"{rate}, PostgreSQL CPU ms per request",
            pick(fixed, ("postgres_cpu_ms_per_request",)),
            digits=3,
            ratios=False,
            override={name: text for name, text in overloaded.items() if name == "tollbooth"},
        )
    )
    capacity = results["capacity"]
    bound = plan["p99_bound_ms"]
    rates = pick(capacity, ("rate",))
    label = f"Highest rate with p99 <= {bound:g} ms (req/s)"
    # A search that passed at its ceiling rate only gives a lower bound.
    capped = {name: ">= " for name in COLUMNS if capacity.get(name, {}).get("capped")}
    lines.append(row(results, label, rates, digits=0, prefix=capped))
    lines.append(
        row(
            results,
            "Peak RSS of the process tree (MiB)",
            pick(results.get("memory", {}), ("peak_rss_mib",)),
            digits=1,
        )
    )

    lines += ["", "| Goal | Target | Measured | Result |", "|---|---|---:|---|"]
    for check in results["checks"]:
        if check.get("text"):
            measured = check["text"]
        elif check["value"] is None:
            measured = NOT_MEASURED
        elif check["unit"] == "x":
            measured = times(check["value"])
        else:
            measured = f"{check['value']:.2f} ms"
        if check["passed"] is None:
            # A value without a verdict means a throughput search reached its ceiling rate.
            result = NOT_MEASURED if check["value"] is None else "UNDECIDED (rate ceiling)"
        else:
            result = "PASS" if check["passed"] else "FAIL"
        lines.append(f"| {check['name']} | {check['goal']} | {measured} | {result} |")

    metering = results.get("metering")
    if metering:
        ledger = "sound" if metering["check_ledger_exit_code"] == 0 else "VIOLATED"
        extra = metering["usage_records"] - metering["ok_responses"]
        note = ""
        if extra > 0:
            note = (
                f" ({extra:,} more records than responses: requests the client gave up on "
                "when a rate step stopped early were still served and charged)"
            )
        elif extra < 0:
            note = f" ({-extra:,} responses WITHOUT a usage record)"
        lines += [
            "",
            f"Metering: Tollbooth wrote {metering['usage_records']:,} usage records for "
            f"{metering['ok_responses']:,} successful responses{note}; ledger check: {ledger}.",
        ]
    for name, reason in results.get("not_measured", {}).items():
        first_line = reason.strip().splitlines()[0] if reason.strip() else ""
        lines += ["", f"{name} not measured: {first_line}"]
    errors = {
        name: entry["errors"]
        for section in ("concurrency1", "streams")
        for name, entry in results[section].items()
        if entry["errors"]
    }
    if errors:
        lines += ["", f"Failed requests at concurrency 1: {errors}"]
    return "\n".join(lines)
