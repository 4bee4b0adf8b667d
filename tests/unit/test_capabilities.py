"""The agent's capability list and doctor's check of it, on given effective sets (the
agent run with them for real: tests/e2e/test_least_privilege.py)."""

from __future__ import annotations

from otel_ebpf.kernel import capabilities, preflight
from otel_ebpf.kernel.capabilities import BITS


def effective(*names: str) -> int:
    return sum(1 << BITS[n] for n in names)


ALL = effective(*capabilities.names())


def test_the_list_is_what_deploy_grants_and_names_kernel_bits() -> None:
    assert capabilities.names() == ["BPF", "PERFMON", "SYS_PTRACE", "SYSLOG",
                                    "DAC_READ_SEARCH", "CHECKPOINT_RESTORE"]
    # capabilities(7): CAP_DAC_READ_SEARCH 2, CAP_SYS_PTRACE 19, CAP_SYSLOG 34, ...
    assert [c.bit for c in capabilities.CAPABILITIES] == [39, 38, 19, 34, 2, 40]
    assert [c.name for c in capabilities.CAPABILITIES if c.required] == ["BPF", "PERFMON"]


def test_broader_capabilities_count_as_the_ones_they_include() -> None:
    assert capabilities.missing(ALL) == []
    assert capabilities.missing((1 << 41) - 1) == []  # full root
    admin = effective("SYS_ADMIN", "SYS_PTRACE", "SYSLOG", "DAC_OVERRIDE")
    assert capabilities.missing(admin) == []
    assert [c.name for c in capabilities.missing(effective("SYS_ADMIN"))] == [
        "SYS_PTRACE", "SYSLOG", "DAC_READ_SEARCH"]


def test_doctor_fails_without_a_required_one_and_names_it() -> None:
    check = preflight.check_privileges(ALL & ~effective("PERFMON"))
    assert check.status == preflight.FAIL
    assert "without CAP_PERFMON (no probe attaches)" in check.detail
    assert check.fix.startswith("grant CAP_PERFMON (the agent's set: CAP_BPF CAP_PERFMON ")


def test_doctor_warns_without_an_optional_one_and_says_what_is_lost() -> None:
    check = preflight.check_privileges(ALL & ~effective("SYSLOG", "CHECKPOINT_RESTORE"))
    assert check.status == preflight.WARN
    assert "CAP_SYSLOG (kernel frames stay addresses" in check.detail
    assert "; CAP_CHECKPOINT_RESTORE (frames in deleted or replaced files" in check.detail
    assert preflight.check_privileges(ALL).status == preflight.OK
