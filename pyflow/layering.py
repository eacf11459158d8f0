"""Settings in layers: RouterOS's defaults, then a file or script (a ``Layer``), then the flags.

``build_settings`` is the one place the layers meet; every error names where the value was set
(FILE:LINE of the file, or the flag).  ``args`` is any object with the flags' values as
attributes (argparse's namespace; None or absent = not given).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pyflow.config import (
    DEFAULT_VERSION,
    AnalyticsSettings,
    SettingError,
    Settings,
    normalize_version,
    parse_interface,
    parse_target,
    signal_values,
)
from pyflow.configfile import Layer
from pyflow.errors import ConfigError
from pyflow.fields import parse_fields


def _flag(args: object, dest: str) -> Any:
    return getattr(args, dest, None)


# (Settings field, RouterOS key, flag dest, flag) of the flags that set one value
_SIMPLE_FLAGS = (
    ("enabled", "enabled", "enabled", "--enabled"),
    ("cache_entries", "cache-entries", "cache_entries", "--cache-entries"),
    ("active_flow_timeout_ns", "active-flow-timeout", "active_flow_timeout", "--active-flow-timeout"),
    ("inactive_flow_timeout_ns", "inactive-flow-timeout", "inactive_flow_timeout", "--inactive-flow-timeout"),
    ("packet_sampling", "packet-sampling", "packet_sampling", "--packet-sampling"),
    ("sampling_interval", "sampling-interval", "sampling_interval", "--sampling-interval"),
    ("sampling_space", "sampling-space", "sampling_space", "--sampling-space"),
    ("sweep_interval_ns", "sweep-interval", "sweep_interval", "--sweep-interval"),
    ("xdp_mode", "xdp-mode", "xdp_mode", "--xdp-mode"),
    ("metrics_address", "metrics-address", "metrics_address", "--metrics-address"),
    ("as_file", "as-file", "as_file", "--as-file"),
    ("control_socket", "control-socket", "control_socket", "--control-socket"),
    ("user", "user", "user", "--user"),
    ("direction", "direction", "direction", "--direction"),
    ("hook", "hook", "hook", "--hook"),
)


def build_settings(base: Layer | None, args: object) -> Settings:
    """RouterOS's defaults, then ``base`` (a file or script), then the flags given."""
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    ipfix: dict[str, bool] = {}
    options = {}
    if base is not None:
        values.update(base.values)
        where.update(base.where)
        ipfix.update(base.ipfix)
        options.update(base.interface_options)
    else:
        values["enabled"] = True  # flags alone: running pyflow is the switch
    for attr, key, dest, flag in _SIMPLE_FLAGS:
        value = _flag(args, dest)
        if value is not None:
            values[attr] = value
            where[key] = flag
    values["interface_options"] = _merge_interfaces(values, where, options, _flag(args, "interface"))
    _merge_targets(values, where, args)
    values["ipfix"] = _merge_fields(ipfix, args)
    values["analytics"] = _analytics_settings(values.get("analytics") or {}, args, where)
    try:
        return Settings(**values)
    except SettingError as exc:
        place = where.get(exc.key) or where.get(exc.key.split(".")[0])
        raise ConfigError(f"{place}: {exc}" if place else str(exc)) from None


def _merge_interfaces(values: dict[str, Any], where: dict[str, str], options: dict[str, Any],
                      specs: list[str] | None) -> tuple[Any, ...]:
    """--interface over the file's interfaces; the per-interface options that apply."""
    if not specs:
        return tuple(options.values())
    direction = values.get("direction", "ingress")
    hook = values.get("hook", "auto")
    names, flag_options = [], {}
    for spec in specs:
        try:
            opt = parse_interface(spec, direction, hook)
        except ConfigError as exc:
            raise ConfigError(f"--interface {spec!r}: {exc}") from None
        names.append(opt.name)
        if opt.name == "all":
            if "," in spec:  # all,direction=both: the options of every interface
                values["direction"], values["hook"] = opt.direction, opt.hook
                where["direction"] = where["hook"] = "--interface"
        elif "," in spec:
            flag_options[opt.name] = opt
            where[f"interface.{opt.name}"] = "--interface"
    values["interfaces"] = tuple(names)
    where["interfaces"] = "--interface"
    # the file's per-interface options stay for the interfaces still metered
    kept = {n: o for n, o in options.items() if n in names or "all" in names}
    kept.update(flag_options)
    return tuple(kept.values())


def _merge_targets(values: dict[str, Any], where: dict[str, str], args: object) -> None:
    """--target replaces the file's targets; --v9-template-* apply to every target."""
    refresh, timeout = _flag(args, "v9_template_refresh"), _flag(args, "v9_template_timeout")
    target_values: dict[str, int] = {}
    if refresh is not None:
        target_values["v9_template_refresh"] = refresh
    if timeout is not None:
        target_values["v9_template_timeout_ns"] = timeout
    version = _flag(args, "default_version")
    targets = _flag(args, "target")
    if targets:
        default_version = normalize_version(version or DEFAULT_VERSION)
        built = []
        for i, spec in enumerate(targets):
            try:
                built.append(parse_target(spec, default_version, **target_values))
            except ConfigError as exc:
                raise ConfigError(f"--target {spec!r}: {exc}") from None
            where[f"target.{i}"] = f"--target {spec!r}"
        values["targets"], values["disabled_targets"] = tuple(built), ()
        return
    if version is not None:
        raise ConfigError("--version sets the version of --target values that name none; with no --target, "
                          "give each [[target]] of the file its version")
    for attr in ("targets", "disabled_targets"):
        if target_values and values.get(attr):
            try:
                values[attr] = tuple(dataclasses.replace(t, **target_values) for t in values[attr])
            except SettingError as exc:
                raise ConfigError(f"--{exc.key}: {exc}") from None


def _merge_fields(ipfix: dict[str, bool], args: object) -> Any:
    """The file's [ipfix] toggles, then --ipfix (a later value wins)."""
    fields = parse_fields([])
    if ipfix:
        fields = fields.with_values(ipfix)
    if _flag(args, "ipfix"):
        try:
            fields = parse_fields(_flag(args, "ipfix"), fields)
        except ConfigError as exc:
            raise ConfigError(f"--ipfix: {exc}") from None
    return fields


def _analytics_settings(given: dict[str, Any], args: object, where: dict[str, str]) -> AnalyticsSettings:
    """[analytics] from the file (``given``), the flags over it; an error says where it was set."""
    kwargs = {k: v for k, v in given.items() if k not in ("thresholds", "floors")}
    per_signal = {"thresholds": dict(given.get("thresholds", {})), "floors": dict(given.get("floors", {}))}
    for attr, dest in (("enabled", "analytics"), ("window_ns", "analytics_window"), ("top", "analytics_top")):
        if _flag(args, dest) is not None:
            kwargs[attr] = _flag(args, dest)
            where[f"analytics.{attr.removesuffix('_ns')}"] = "--" + dest.replace("_", "-")
    for attr, dest, flag in (("thresholds", "analytics_threshold", "--analytics-threshold"),
                             ("floors", "analytics_floor", "--analytics-floor")):
        for text in _flag(args, dest) or ():
            for sig, value in signal_values(flag, text).items():
                per_signal[attr][sig] = value
                where[f"analytics.{sig.replace('_', '-')}-{attr[:-1]}"] = flag
    try:
        return AnalyticsSettings(**kwargs, thresholds=tuple(per_signal["thresholds"].items()),
                                 floors=tuple(per_signal["floors"].items()))
    except SettingError as exc:
        place = where.get(exc.key) or where.get("analytics")
        raise ConfigError(f"{place}: {exc}" if place else str(exc)) from None
