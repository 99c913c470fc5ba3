#!/usr/bin/env bash
# DarkGPU provider installer:  curl -fsSL <platform>/install.sh | bash
#
# Downloads the agent's wheel from the platform (checking its SHA-256), detects the NVIDIA GPU
# (driver 535+, CUDA 12+), creates a Python environment, installs the agent with what the
# model replicas need (its `serving` extra) and the tested vLLM release, writes
# ~/.config/darkgpu/provider.toml, and optionally installs the systemd user unit.
# Then:  darkgpu auth  and  darkgpu serve.
#
# Options (also as environment variables):
#   --api-url URL       DARKGPU_API_URL      the platform (default: the one serving this script)
#   --package SPEC      DARKGPU_PACKAGE      the agent's package (default: the platform's wheel),
#                                            installed with its [serving] extra
#   --wheel-sha256 HEX  DARKGPU_WHEEL_SHA256 the SHA-256 a downloaded wheel must have
#   --home DIR          DARKGPU_HOME         where the environment goes
#                                            (default ~/.local/share/darkgpu-agent)
#   --systemd | --no-systemd                 install the systemd user unit (default: ask)
#   --skip-vllm                              do not install vLLM
#   --check                                  only check the machine, change nothing
set -euo pipefail

# The platform that serves this script writes its own values here (serve_app/installer.py).
DEFAULT_API_URL='https://api.darkgpu.ai'
DEFAULT_PACKAGE='darkgpu'
DEFAULT_WHEEL_SHA256=''
API_URL="${DARKGPU_API_URL:-$DEFAULT_API_URL}"
PACKAGE="${DARKGPU_PACKAGE:-$DEFAULT_PACKAGE}"
WHEEL_SHA256="${DARKGPU_WHEEL_SHA256:-$DEFAULT_WHEEL_SHA256}"
HOME_DIR="${DARKGPU_HOME:-$HOME/.local/share/darkgpu-agent}"
CONFIG_DIR="${DARKGPU_CONFIG_DIR:-${XDG_CONFIG_HOME:-$HOME/.config}/darkgpu}"
SYSTEMD="ask"
SKIP_VLLM=0
CHECK_ONLY=0
MIN_DRIVER=535
MIN_CUDA_MAJOR=12

say() { printf '%s\n' "$*"; }
die() { printf 'darkgpu install: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --api-url) API_URL="$2"; shift 2 ;;
    --package) PACKAGE="$2"; shift 2 ;;
    --wheel-sha256) WHEEL_SHA256="$2"; shift 2 ;;
    --home) HOME_DIR="$2"; shift 2 ;;
    --systemd) SYSTEMD="yes"; shift ;;
    --no-systemd) SYSTEMD="no"; shift ;;
    --skip-vllm) SKIP_VLLM=1; shift ;;
    --check) CHECK_ONLY=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done

# --- the machine ----------------------------------------------------------------------------
[ "$(uname -s)" = "Linux" ] || die "DarkGPU providers need Linux (this is $(uname -s))."

PYTHON=""
for candidate in python3.13 python3.12 python3.11 python3; do
  if command -v "$candidate" >/dev/null 2>&1 \
     && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    PYTHON="$(command -v "$candidate")"; break
  fi
done
[ -n "$PYTHON" ] || die "Python 3.11 or newer is needed (python3.11 and its venv module)."
"$PYTHON" -c 'import venv' 2>/dev/null \
  || die "$PYTHON has no venv module (Debian/Ubuntu: apt install python3-venv)."
say "Python: $PYTHON ($("$PYTHON" -c 'import platform; print(platform.python_version())'))"

# --- the agent's wheel, from the platform --------------------------------------------------
# Fetched before the GPU is looked at (it is small): a platform that cannot hand out its agent
# is found out first. It is installed only if its SHA-256 is the one this script was given.
sha256_of() { "$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"; }
if [ "$CHECK_ONLY" = 0 ]; then
  case "$PACKAGE" in
    http://*.whl|https://*.whl)
      [ -n "$WHEEL_SHA256" ] \
        || die "No SHA-256 for $PACKAGE (--wheel-sha256): an unchecked download is not installed."
      command -v curl >/dev/null 2>&1 || die "curl is needed to download the agent."
      WHEEL_NAME="${PACKAGE##*/}"
      case "$WHEEL_NAME" in *[!A-Za-z0-9._+-]*) die "Not a wheel file name: $WHEEL_NAME" ;; esac
      mkdir -p "$HOME_DIR/dist"
      WHEEL="$HOME_DIR/dist/$WHEEL_NAME"
      say "Downloading the agent: $PACKAGE"
      curl -fsSL --proto '=http,https' -o "$WHEEL.part" "$PACKAGE" \
        || die "Could not download the agent from $PACKAGE."
      GOT="$(sha256_of "$WHEEL.part")"
      if [ "$GOT" != "$WHEEL_SHA256" ]; then
        rm -f "$WHEEL.part"
        die "The agent's SHA-256 is $GOT, not $WHEEL_SHA256: not installed."
      fi
      mv "$WHEEL.part" "$WHEEL"
      say "Agent: $WHEEL (SHA-256 verified)"
      PACKAGE="$WHEEL"
      ;;
  esac
fi

# --- the GPU --------------------------------------------------------------------------------
command -v nvidia-smi >/dev/null 2>&1 \
  || die "No NVIDIA driver found (nvidia-smi is missing). Install the NVIDIA driver ${MIN_DRIVER} or newer first."

GPU_CSV="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits 2>/dev/null)" \
  || die "nvidia-smi failed: is the NVIDIA driver loaded? (try running nvidia-smi)"
[ -n "$GPU_CSV" ] || die "The NVIDIA driver sees no GPU."

GPU_NAME="$(printf '%s\n' "$GPU_CSV" | head -n1 | cut -d, -f1 | sed 's/^ *//;s/ *$//')"
GPU_MIB="$(printf '%s\n' "$GPU_CSV" | head -n1 | cut -d, -f2 | tr -d ' ')"
DRIVER="$(printf '%s\n' "$GPU_CSV" | head -n1 | cut -d, -f3 | tr -d ' ')"
GPU_COUNT="$(printf '%s\n' "$GPU_CSV" | grep -c .)"
DRIVER_MAJOR="${DRIVER%%.*}"
case "$DRIVER_MAJOR" in ''|*[!0-9]*) die "Cannot read the driver version ('$DRIVER')." ;; esac
[ "$DRIVER_MAJOR" -ge "$MIN_DRIVER" ] \
  || die "NVIDIA driver $DRIVER is too old: DarkGPU needs driver ${MIN_DRIVER} or newer."

CUDA="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9.]*\).*/\1/p' | head -n1)"
[ -n "$CUDA" ] || die "Cannot read the CUDA version from nvidia-smi."
[ "${CUDA%%.*}" -ge "$MIN_CUDA_MAJOR" ] \
  || die "The driver supports CUDA $CUDA: DarkGPU needs CUDA ${MIN_CUDA_MAJOR} or newer."

say "GPU: ${GPU_COUNT} x ${GPU_NAME}, $((GPU_MIB / 1024)) GiB, driver ${DRIVER}, CUDA ${CUDA}"

if [ "$CHECK_ONLY" = 1 ]; then
  say "This machine can run the DarkGPU agent."
  exit 0
fi

# --- the environment ------------------------------------------------------------------------
VENV="$HOME_DIR/venv"
if [ ! -x "$VENV/bin/python" ]; then
  say "Creating $VENV"
  mkdir -p "$HOME_DIR"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# The agent alone (`pip install darkgpu`) needs none of the platform; but Ray runs the model
# replicas this node hosts in this environment's Python, and they need Ray Serve and the
# platform's serving code: the `serving` extra. `darkgpu` -> `darkgpu[serving]`,
# `darkgpu==0.2` -> `darkgpu[serving]==0.2`, a wheel or folder -> `PATH[serving]`; a SPEC that
# names extras already is taken as it is.
with_serving() {
  local name="${1%%[<>=!~;@ ]*}"
  case "$1" in *\[*) printf '%s' "$1"; return ;; esac
  case "$name" in
    */*|*.whl|*.tar.gz|*.zip) printf '%s[serving]' "$1" ;;
    *) printf '%s[serving]%s' "$name" "${1#"$name"}" ;;
  esac
}
AGENT="$(with_serving "$PACKAGE")"
say "Installing the agent and what the model replicas need ($AGENT)"
"$VENV/bin/python" -m pip install --quiet --upgrade "$AGENT"

# One vLLM release everywhere: the CUDA build of the release the platform is tested with (the
# Makefile's VLLM_RELEASE); a GPU running any other release is an untested path.
VLLM_RELEASE=0.32.0
if [ "$SKIP_VLLM" = 0 ]; then
  if [ "$("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)' 2>/dev/null)" = "$VLLM_RELEASE" ]; then
    say "vLLM $VLLM_RELEASE is already installed."
  else
    say "Installing vLLM $VLLM_RELEASE (a few GB; this takes a while)"
    "$VENV/bin/python" -m pip install --quiet "vllm==$VLLM_RELEASE"
  fi
fi

mkdir -p "$HOME/.local/bin"
ln -sf "$VENV/bin/darkgpu" "$HOME/.local/bin/darkgpu"

# --- the config -----------------------------------------------------------------------------
mkdir -p "$CONFIG_DIR" && chmod 700 "$CONFIG_DIR"
DARKGPU_CONFIG_DIR="$CONFIG_DIR" "$VENV/bin/python" -m agent_bootstrap.config \
  --api-url "$API_URL" "$CONFIG_DIR/provider.toml"

# --- systemd --------------------------------------------------------------------------------
if [ "$SYSTEMD" = "ask" ]; then
  SYSTEMD="no"
  if [ -r /dev/tty ] && command -v systemctl >/dev/null 2>&1; then
    printf 'Install the systemd unit, so the agent starts with the machine? [y/N] ' >/dev/tty
    read -r answer </dev/tty || answer=""
    case "$answer" in y|Y|yes) SYSTEMD="yes" ;; esac
  fi
fi
if [ "$SYSTEMD" = "yes" ]; then
  UNIT_DIR="${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user"
  mkdir -p "$UNIT_DIR"
  # The same unit as configs/systemd/darkgpu-agent.service, with this install's path.
  sed "s|%h/.local/share/darkgpu-agent|$HOME_DIR|" >"$UNIT_DIR/darkgpu-agent.service" <<'UNIT'
# BEGIN UNIT
# DarkGPU provider agent, as a systemd *user* unit (install.sh --systemd puts it in
# ~/.config/systemd/user/ and enables it). To keep it running while you are logged out:
#   loginctl enable-linger "$USER"
# Stopping it (systemctl --user stop darkgpu-agent) drains the node first: in-flight
# requests finish, then the agent leaves the cluster; TimeoutStopSec leaves room for that.
[Unit]
Description=DarkGPU provider agent (lends this GPU to the DarkGPU cluster)
Documentation=https://darkgpu.ai/docs
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart=%h/.local/share/darkgpu-agent/venv/bin/darkgpu serve
Restart=on-failure
RestartSec=30
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec=180
Environment=PYTHONUNBUFFERED=1

[Install]
WantedBy=default.target
# END UNIT
UNIT
  systemctl --user daemon-reload
  systemctl --user enable darkgpu-agent.service
  say "Installed $UNIT_DIR/darkgpu-agent.service (enabled; start it after darkgpu auth:"
  say "  systemctl --user start darkgpu-agent; keep it running logged out: loginctl enable-linger)"
fi

say ""
say "Installed. Next:"
say "  darkgpu auth     # paste your provider token (dgpp-...)"
say "  darkgpu serve    # or: systemctl --user start darkgpu-agent"
