# Sourced by the build scripts: where a build is cached, outside any checkout.
#   cache_dir NAME [OVERRIDE]  prints the absolute, existing directory: OVERRIDE when set,
#                              else /var/cache/otel-ebpf/NAME, else (not writable there, e.g.
#                              not root) ${XDG_CACHE_HOME:-~/.cache}/otel-ebpf/NAME
cache_dir() {
    local name=$1 dir=${2:-}
    if [[ -z "${dir}" ]]; then
        dir="/var/cache/otel-ebpf/${name}"
        if ! mkdir -p "${dir}" 2>/dev/null || [[ ! -w "${dir}" ]]; then
            dir="${XDG_CACHE_HOME:-${HOME}/.cache}/otel-ebpf/${name}"
        fi
    fi
    mkdir -p "${dir}" && (cd "${dir}" && pwd)
}
