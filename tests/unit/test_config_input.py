"""Config files as users hand them over: every unusable file is exit 2 with one paragraph
naming the file and the fix, never a traceback; YAML's booleans where a switch word is
expected; and a fuzzed loader that either loads or raises ConfigError."""

from __future__ import annotations

import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from otel_ebpf import cli
from otel_ebpf import config as cfg


def _write(text: str | bytes) -> Callable[[Path], Path]:
    def make(tmp_path: Path) -> Path:
        path = tmp_path / "c.yaml"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return path
    return make


def _directory(tmp_path: Path) -> Path:
    (tmp_path / "conf.d").mkdir()
    return tmp_path / "conf.d"


def _dangling(tmp_path: Path) -> Path:
    link = tmp_path / "c.yaml"
    link.symlink_to(tmp_path / "gone.yaml")
    return link


def _fifo(tmp_path: Path) -> Path:
    os.mkfifo(tmp_path / "c.yaml")  # reading it would block: it must never be opened
    return tmp_path / "c.yaml"


BAD_FILES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "latin-1": (_write("service_name: caf\xe9\n".encode("latin-1")),
                "is not UTF-8 text (byte 0xe9 at offset 17)"),
    "binary garbage": (_write(bytes(range(256)) * 4), "is not UTF-8 text"),
    "control characters": (_write(b"a: \x00\x01\x02\n"), "is not valid YAML"),
    "directory": (_directory, "is a directory"),
    "dangling symlink": (_dangling, "is a symbolic link to a missing file"),
    "missing": (lambda tmp: tmp / "missing.yaml", "does not exist"),
    "fifo": (_fifo, "is not a regular file"),
    "invalid yaml": (_write("probes:\n  syscall_latency: [\n"), "is not valid YAML"),
    "bad indentation": (_write("a: b\n c: d\n"),
                        "is not valid YAML (mapping values are not allowed here at line 2"),
    "a list": (_write("- a\n- b\n"), "holds a list, but its top level must be a mapping"),
    "a string": (_write("just words\n"), "holds a str"),
    "impossible date": (_write("service_name: 2024-02-30\n"), "has a value YAML cannot build"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_unusable_files_name_the_file_and_the_fix(tmp_path: Path, case: str) -> None:
    make, problem = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(cfg.ConfigError) as raised:
        cfg.load(path, env={})
    message = str(raised.value)
    assert message.startswith(f"config file {path} {problem}")
    assert "Fix: point --config at a readable YAML file" in message
    assert "\n" not in message  # one paragraph


def test_an_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # root reads through chmod 000, so the kernel's refusal is simulated
    path = _write("a: 1\n")(tmp_path)

    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(cfg.ConfigError, match=r"cannot be read \(Permission denied\)"):
        cfg.load(path, env={})


@pytest.mark.parametrize("command", [["run"], ["doctor", "--no-load"]])
@pytest.mark.parametrize("case", ["latin-1", "directory", "dangling symlink", "invalid yaml",
                                  "a list", "binary garbage"])
def test_every_command_that_reads_config_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], case: str
) -> None:
    path = BAD_FILES[case][0](tmp_path)
    assert cli.main([*command, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"otel-ebpf: config file {path} ")
    assert "Traceback" not in err


def test_a_broken_file_at_a_default_path_is_not_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "otel-ebpf.yaml").symlink_to(tmp_path / "nowhere")
    with pytest.raises(cfg.ConfigError, match="symbolic link to a missing file"):
        cfg.load(env={})


# ---- YAML booleans where a switch word is expected ------------------------------------

@pytest.mark.parametrize(("written", "mode"), [
    ("on", "on"), ("off", "off"), ("yes", "on"), ("no", "off"), ("true", "on"),
    ("false", "off"), ("On", "on"), ("OFF", "off"), ("'on'", "on"), ("'yes'", "on"),
    ("auto", "auto"),
])
def test_kubernetes_mode_as_users_write_it(tmp_path: Path, written: str, mode: str) -> None:
    path = _write(f"identity:\n  kubernetes:\n    mode: {written}\n")(tmp_path)
    assert cfg.load(path, env={})[0].identity.kubernetes.mode == mode


def test_booleans_stay_refused_where_no_switch_is_expected(tmp_path: Path) -> None:
    path = _write("probes:\n  tcp_retransmit:\n    aggregation: on\n")(tmp_path)
    with pytest.raises(cfg.ConfigError, match=r"probes\.tcp_retransmit\.aggregation"):
        cfg.load(path, env={})
    with pytest.raises(cfg.ConfigError, match=r"identity\.kubernetes\.mode"):
        cfg.load(_write("identity:\n  kubernetes:\n    mode: 1\n")(tmp_path), env={})


def _word_fields(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every field whose type is a Literal of words, by dotted name, with its metadata."""
    found: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            found.update(_word_fields(ann, f"{prefix}{name}."))
        elif typing.get_origin(ann) is typing.Literal:
            found[prefix + name] = (typing.get_args(ann), field.metadata)
    return found


def test_every_on_off_setting_takes_yaml_booleans() -> None:
    """A Literal that offers on/off (or yes/no, true/false) must take what YAML 1.1 makes
    of those words unquoted: a bool."""
    switches = {name: meta for name, (choices, meta) in _word_fields(cfg.Config).items()
                if {"on", "off", "yes", "no", "true", "false"} & set(choices)}
    assert set(switches) == {"identity.kubernetes.mode"}
    for meta in switches.values():
        assert any(getattr(m, "func", None) is cfg.switch_word for m in meta)


# ---- fuzz: load or ConfigError, nothing else ------------------------------------------

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

_keys = st.sampled_from(["probes", "syscall_latency", "tcp_retransmit", "cpu_profile",
                         "identity", "kubernetes", "mode", "interval", "aggregation",
                         "exporter", "enabled", "filter", "comms", "service_name", "x"])
_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
            | st.sampled_from(["on", "off", "10s", "250ms", "peer", "1MiB", "-1", ""]))
_documents = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys | _scalars, inner,
                                                                  max_size=4),
    max_leaves=12)


def _load_or_config_error(path: Path) -> None:
    try:
        cfg.load(path, env={})
    except cfg.ConfigError as exc:
        assert str(exc).strip()


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_bytes(tmp_path: Path, data: bytes) -> None:
    _load_or_config_error(_write(data)(tmp_path))


@FUZZ
@given(document=_documents)
def test_fuzz_yaml_documents(tmp_path: Path, document: Any) -> None:
    _load_or_config_error(_write(yaml.safe_dump(document, allow_unicode=True))(tmp_path))


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("ab: -[]{}!&*'\"\n\t#|>?%@,0129.~\\")),
                    max_size=60))
def test_fuzz_yaml_syntax(tmp_path: Path, text: str) -> None:
    _load_or_config_error(_write(text)(tmp_path))
