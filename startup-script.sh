#!/bin/bash
# spotrunner GCE startup script: install spotrunner and run it as a systemd service.
#
# Attach it to a Spot VM (or instance template) with
#   --metadata-from-file=startup-script=startup-script.sh
# GCE runs it as root on every boot: first boot, STOP/START, a recreated MIG member.
# The first run installs; later runs find the stamp and exit within a second, and
# the enabled unit starts on its own (it is ordered after google-startup-scripts,
# so an install or upgrade always finishes before spotrunner starts).
#
# Instance attributes (instance first, then project metadata):
#   spotrunner-store    required  gs://BUCKET[/PREFIX]   (read by spotrunner itself too)
#   spotrunner-install  required  what to install, one of
#                         a pip requirement        spotrunner==0.1.0
#                         a git URL at a pinned ref git+https://github.com/ORG/spotrunner@v0.1.0
#                         a wheel in GCS            gs://BUCKET/wheels/spotrunner-0.1.0-py3-none-any.whl
#   spotrunner-run-id   optional  (read by spotrunner)
#   spotrunner-config   optional  TOML (read by spotrunner)
#   spotrunner-install-ops-agent  optional  "true": install the Google Cloud Ops Agent
# The install is redone only when spotrunner-install or this script changes, so pin
# versions: a moved git branch or an overwritten wheel is not noticed.
#
# Usage: startup-script.sh                  install (or do nothing when installed)
#        startup-script.sh --print-unit     print the embedded systemd unit
#        startup-script.sh --print-ops-agent-config
#
# Environment overrides (tests run the script in a scratch root with stub commands):
#   INSTALL_ROOT  prefix for every path written (default: empty, i.e. /)
#   GCE_METADATA_HOST  metadata server host[:port] (default metadata.google.internal)
#   SYSTEMCTL APT_GET USERADD GETENT GCLOUD CURL  commands to run
#   PYTHON        the interpreter to build the venv from (default: probe, see pick_python)
#   CONSOLE       serial console device to log to when writable (default /dev/ttyS0)
set -Eeuo pipefail

readonly SCRIPT_VERSION=1
INSTALL_ROOT=${INSTALL_ROOT:-}
METADATA_HOST=${GCE_METADATA_HOST:-metadata.google.internal}
SYSTEMCTL=${SYSTEMCTL:-systemctl}
APT_GET=${APT_GET:-apt-get}
USERADD=${USERADD:-useradd}
GETENT=${GETENT:-getent}
GCLOUD=${GCLOUD:-gcloud}
CURL=${CURL:-curl}
CONSOLE=${CONSOLE:-/dev/ttyS0}

readonly SERVICE_USER=spotrunner
readonly PREFIX=$INSTALL_ROOT/opt/spotrunner
readonly VENV_LINK=$PREFIX/venv
readonly STAMP=$PREFIX/installed
readonly UNIT_PATH=$INSTALL_ROOT/etc/systemd/system/spotrunner.service
readonly OPS_AGENT_DIR=$INSTALL_ROOT/etc/google-cloud-ops-agent
readonly OPS_AGENT_MARKER='# spotrunner: Google Cloud Ops Agent logging config'
export DEBIAN_FRONTEND=noninteractive

log() {
  local line="spotrunner-startup: $*"
  printf '%s\n' "$line"
  # The serial console is where an operator looks first
  # (gcloud compute instances get-serial-port-output), even if the guest agent's own
  # forwarding of this output is broken.
  if [[ -n $CONSOLE && -w $CONSOLE ]]; then
    printf '%s\n' "$line" >>"$CONSOLE" 2>/dev/null || true
  fi
}

die() {
  log "ERROR: $*"
  exit 1
}

on_error() {
  log "ERROR: line $1: '$2' failed (exit $3); spotrunner was not (re)installed. Fix it and rerun: sudo google_metadata_script_runner startup"
}
trap 'on_error "$LINENO" "$BASH_COMMAND" "$?"' ERR

print_unit() {
  cat <<'UNIT'
# spotrunner: preemption-aware PyTorch training daemon for GCE Spot VMs.
#
# Installed as /etc/systemd/system/spotrunner.service by startup-script.sh, which
# also creates the `spotrunner` system user and the venv in /opt/spotrunner/venv.
# With `--metadata on` the run's settings come from the instance attributes
# spotrunner-store, spotrunner-run-id and spotrunner-config (TOML).
#
# Operators override settings with a drop-in, not by editing this file:
#   systemctl edit spotrunner        (writes /etc/systemd/system/spotrunner.service.d/override.conf)
#     [Service]
#     # Settings: any SPOTRUNNER_<NAME> from `spotrunner run --help`, e.g.
#     Environment=SPOTRUNNER_EPOCHS=30 SPOTRUNNER_CHECKPOINT_INTERVAL=120
#     Environment=SPOTRUNNER_PREEMPTION_NOTICE_SECONDS=120
#     # Or replace the command line (an empty ExecStart= clears the one below first):
#     ExecStart=
#     ExecStart=/opt/spotrunner/venv/bin/spotrunner run --metadata on --device cuda
#   If you raise --stop-deadline, raise TimeoutStopSec with it (see below).
#
# Exit codes (spotrunner/exitcodes.py) and what systemd does with them:
#   0   training completed            -> success, no restart
#   75  stopped after committing a checkpoint (preemption notice or signal)
#                                     -> success (SuccessExitStatus), no restart
#   73  fenced: another writer owns the run -> failed, no restart
#   78  configuration error           -> failed, no restart (fix the attribute/drop-in)
#   130 aborted by a second SIGINT    -> failed, no restart (a human asked for it)
#   1 / other / crash                 -> failed, restarted after RestartSec
#
# Why 75 is not restarted even when systemd did not ask for the stop: spotrunner
# exits 75 on its own only after a preemption or host-maintenance notice from the
# metadata server, i.e. the VM is about to be powered off. A restart would reload
# the checkpoint, see instance/preempted=TRUE again and stop at once, churning
# through the notice window and the start limit for nothing. The next boot (STOP/
# START, a recreated MIG member, or `systemctl start spotrunner` after a manual
# `kill -TERM`) resumes from the committed checkpoint.

[Unit]
Description=spotrunner preemption-aware training daemon
Documentation=https://github.com/spotrunner/spotrunner#readme
# Network for the GCS store and the metadata server. At shutdown the order is
# reversed: spotrunner stops (and commits its emergency checkpoint) before the
# network, the shutdown scripts and the Ops Agent's log shipper go down, so the
# checkpoint reaches the bucket and its log lines reach Cloud Logging.
Wants=network-online.target
After=network-online.target
After=google-startup-scripts.service google-shutdown-scripts.service
After=google-cloud-ops-agent-fluent-bit.service google-guest-agent.service
# A crash loop gives up after StartLimitBurst starts within the interval (the
# supervisor already restarts a crashed trainer itself; this is the second layer).
StartLimitIntervalSec=30min
StartLimitBurst=5

[Service]
Type=notify
# Only the supervisor may send READY/STATUS/STOPPING/WATCHDOG, not the trainer.
NotifyAccess=main
# GPU device nodes: /dev is rebuilt at every boot and CUDA would create missing
# nodes through the setuid nvidia-modprobe, which NoNewPrivileges forbids. '+' runs
# these as root outside the sandbox; '-' makes them optional (no GPU, no driver).
ExecStartPre=-+/usr/bin/nvidia-modprobe -u -c=0
ExecStartPre=-+/usr/bin/nvidia-smi -L
ExecStart=/opt/spotrunner/venv/bin/spotrunner run --metadata on
Environment=PYTHONUNBUFFERED=1 SPOTRUNNER_LOG_FORMAT=json
# SIGTERM goes to the supervisor only; it asks the trainer to checkpoint and stop.
# Whatever is left when TimeoutStopSec runs out gets SIGKILL.
KillMode=mixed
KillSignal=SIGTERM
# Spot VMs get ~30 s between ACPI soft-off and power-off. The trainer's stop
# deadline is 20 s (--stop-deadline); 25 s leaves the supervisor time to log and
# exit, and leaves ~5 s for the log shipper to flush before power-off.
TimeoutStopSec=25s
# Starting includes importing torch, CUDA initialisation, the first CIFAR-10
# download and restoring a checkpoint from GCS before READY=1.
TimeoutStartSec=15min
# The supervisor pings from its main loop; a hung trainer is its business
# (--hang-timeout), so this only catches a wedged supervisor.
WatchdogSec=5min
Restart=on-failure
RestartSec=30s
RestartPreventExitStatus=73 78 130
SuccessExitStatus=75

# Files: /var/lib/spotrunner ($STATE_DIRECTORY) holds the emergency spill
# (spill/) and the dataset; it survives reboots and STOP/START (not DELETE).
# A local --store also belongs under it, e.g. /var/lib/spotrunner/runs.
User=spotrunner
Group=spotrunner
StateDirectory=spotrunner
StateDirectoryMode=0750
CacheDirectory=spotrunner
WorkingDirectory=/var/lib/spotrunner
Environment=SPOTRUNNER_DATA_DIR=/var/lib/spotrunner/data
# torch.compile / Triton and matplotlib write caches under $HOME or these.
Environment=HOME=/var/lib/spotrunner XDG_CACHE_HOME=/var/cache/spotrunner
Environment=TRITON_CACHE_DIR=/var/cache/spotrunner/triton MPLCONFIGDIR=/var/cache/spotrunner/matplotlib
UMask=0027
LimitNOFILE=65536

# Hardening. Measured: `systemd-analyze security --offline=true` scores 1.4 (see
# tests/test_systemd_unit.py). CUDA needs /dev/nvidia*, so devices are allow-listed
# instead of PrivateDevices=yes (which would hide them), and W^X memory is allowed
# (MemoryDenyWriteExecute=no) because CUDA, Triton and torch's JITs map code at run time.
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateUsers=yes
ProtectHostname=yes
ProtectClock=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectProc=invisible
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
PrivateMounts=yes
KeyringMode=private
# AF_UNIX: the sd_notify socket and the supervisor<->trainer socket; AF_INET(6):
# GCS, the metadata server, torch.distributed; AF_NETLINK: interface discovery
# (getifaddrs) used by gloo/NCCL under torchrun.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @mount @swap @reboot @raw-io @debug @obsolete @cpu-emulation @clock @module
SystemCallErrorNumber=EPERM
DevicePolicy=closed
DeviceAllow=char-nvidia-frontend rw
DeviceAllow=char-nvidia-uvm rw
DeviceAllow=char-nvidia-caps rw
MemoryDenyWriteExecute=no

[Install]
WantedBy=multi-user.target
UNIT
}

print_ops_agent_config() {
  cat <<'OPSAGENT'
# spotrunner: Google Cloud Ops Agent logging config (/etc/google-cloud-ops-agent/config.yaml).
#
# The agent ships only /var/log/messages and /var/log/syslog by default; it neither
# reads the journal nor parses JSON inside a journal MESSAGE. This adds one pipeline:
#   journald -> keep only spotrunner.service -> parse the JSON line -> map `severity`.
# The result lands in log `projects/PROJECT/logs/spotrunner` as a jsonPayload with the
# event's fields (event, step, reason, source, bytes, seconds, code, weights_sha256),
# the entry severity from spotrunner's `severity`, and the entry labels run_id and
# component from `logging.googleapis.com/labels` (a special key the agent maps itself).
#
# Why the journal and not a log file: `journalctl -u spotrunner` and
# `systemctl status spotrunner` keep working, nothing needs rotating, and the
# agent reads lines spotrunner wrote during the last seconds before power-off
# without a file tail racing the shutdown. The journald receiver has no unit filter,
# so the first processor drops every other unit's entries.
#
# startup-script.sh installs this file when config.yaml is absent or holds only
# comments (the package's default); an existing custom config is left alone and the
# script logs that these sections must be merged by hand. The built-in syslog
# pipeline is kept: this file adds to it.
#
# Logs Explorer, one run's preemptions and checkpoints (replace RUN_ID):
#   logName:"/logs/spotrunner"
#   labels.run_id="RUN_ID"
#   jsonPayload.event=("preemption_notice" OR "checkpoint_committed" OR "training_started")
logging:
  receivers:
    spotrunner:
      type: systemd_journald
  processors:
    spotrunner_unit_only:
      type: exclude_logs
      match_any:
        - 'NOT jsonPayload._SYSTEMD_UNIT = "spotrunner.service"'
    spotrunner_parse_json:
      type: parse_json
      # Journal entries arrive as jsonPayload fields; the line itself is MESSAGE.
      # Not time_key: the journal's own timestamp is the moment the line was written.
      field: MESSAGE
    spotrunner_severity:
      type: modify_fields
      fields:
        # A plain `severity` key is not special to the agent; without this every
        # line would keep the journal PRIORITY's INFO.
        severity:
          move_from: jsonPayload.severity
  service:
    pipelines:
      spotrunner:
        receivers: [spotrunner]
        processors: [spotrunner_unit_only, spotrunner_parse_json, spotrunner_severity]
OPSAGENT
}

# metadata KEY: the attribute's value from instance, else project metadata; empty when
# defined nowhere. Fails on anything but 200/404 after curl's retries (503/429 happen).
metadata() {
  local key=$1 scope body code
  body=$(mktemp)
  for scope in instance project; do
    code=$("$CURL" -sS -o "$body" -w '%{http_code}' -H 'Metadata-Flavor: Google' \
      --connect-timeout 2 --max-time 10 --retry 6 --retry-delay 1 --retry-connrefused \
      "http://$METADATA_HOST/computeMetadata/v1/$scope/attributes/$key") || code=000
    case $code in
      200) cat "$body"; rm -f "$body"; return 0 ;;
      404) ;;
      *) rm -f "$body"; die "metadata server http://$METADATA_HOST answered HTTP $code for $scope/attributes/$key; is this a GCE VM with a working metadata server?" ;;
    esac
  done
  rm -f "$body"
}

python_ok() {
  "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

python_version() {
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'
}

has_torch() {
  "$1" -c 'import torch' >/dev/null 2>&1
}

# pick_python: the interpreter to build the venv from. Google's Deep Learning VM
# images ship a CUDA build of torch matched to the installed driver; a venv made
# with --system-site-packages from that interpreter reuses it instead of pulling a
# second 2+ GB torch from PyPI (pip keeps it when it meets setup.cfg's torch>=2.6).
# So: an interpreter that already imports torch wins, else the first >= 3.11.
pick_python() {
  local candidates candidate first=""
  if [[ -n ${PYTHON:-} ]]; then
    candidates=("$PYTHON")
  else
    candidates=(/opt/conda/bin/python3 /opt/python/bin/python3 python3.13 python3.12 python3.11 python3)
  fi
  for candidate in "${candidates[@]}"; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    python_ok "$candidate" || continue
    if has_torch "$candidate"; then
      printf '%s torch\n' "$(command -v "$candidate")"
      return 0
    fi
    [[ -n $first ]] || first=$(command -v "$candidate")
  done
  [[ -n $first ]] && printf '%s\n' "$first"
  return 0
}

ensure_python() {
  local picked
  picked=$(pick_python)
  if [[ -z $picked ]]; then
    log "no Python >= 3.11 found; installing python3 with apt-get"
    "$APT_GET" update -q
    "$APT_GET" install -y -q python3 python3-venv ca-certificates
    picked=$(pick_python)
    [[ -n $picked ]] || die "spotrunner needs Python >= 3.11 and this image's python3 is $(python_version python3 2>/dev/null || echo missing); use Debian 12, Ubuntu 24.04 or a Deep Learning VM image with Python 3.11+"
  fi
  PY=${picked%% *}
  SYSTEM_SITE=""
  [[ $picked == *" torch" ]] && SYSTEM_SITE=--system-site-packages
  if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    local pkg
    pkg="python$(python_version "$PY")-venv"
    log "installing $pkg (python -m venv needs ensurepip)"
    "$APT_GET" update -q
    "$APT_GET" install -y -q "$pkg"
  fi
}

ensure_user() {
  if "$GETENT" passwd "$SERVICE_USER" >/dev/null 2>&1; then
    return 0
  fi
  log "creating system user $SERVICE_USER"
  "$USERADD" --system --user-group --home-dir /var/lib/spotrunner --no-create-home \
    --shell /usr/sbin/nologin --comment "spotrunner training daemon" "$SERVICE_USER"
}

# install_spotrunner SOURCE KEY: a fresh venv in venvs/KEY with spotrunner from
# SOURCE, then the venv symlink flipped to it. A failed install leaves the previous
# venv (and the running unit) untouched; venvs are not relocatable, hence one
# directory per install and a symlink.
install_spotrunner() {
  local source=$1 key=$2 venv=$PREFIX/venvs/$2 requirement=$1 download
  case $source in
    git+*)
      [[ ${source##*/} == *@* ]] || die "spotrunner-install: '$source' has no pinned ref; append @TAG or @COMMIT (the install is only redone when the attribute changes)"
      if ! command -v git >/dev/null 2>&1; then
        log "installing git for $source"
        "$APT_GET" update -q
        "$APT_GET" install -y -q git
      fi
      ;;
    gs://*.whl)
      download=$(mktemp -d)
      log "copying $source"
      "$GCLOUD" storage cp "$source" "$download/"
      requirement=$download/${source##*/}
      ;;
    gs://*)
      die "spotrunner-install: '$source' is not a .whl object; build one with 'python -m build --wheel' and copy it to the bucket"
      ;;
  esac
  rm -rf "$venv"
  mkdir -p "$PREFIX/venvs"
  log "creating venv $venv from $PY ${SYSTEM_SITE:-(isolated)}"
  # shellcheck disable=SC2086  # SYSTEM_SITE is empty or one flag
  "$PY" -m venv $SYSTEM_SITE "$venv"
  log "pip install $requirement"
  "$venv/bin/pip" install --disable-pip-version-check --no-input --progress-bar off "$requirement"
  [[ -x $venv/bin/spotrunner ]] || die "pip installed '$requirement' but $venv/bin/spotrunner is missing; is it the spotrunner package?"
  ln -sfn "venvs/$key" "$PREFIX/venv.new"
  mv -T "$PREFIX/venv.new" "$VENV_LINK"
  local old
  for old in "$PREFIX"/venvs/*; do
    [[ $old == "$venv" ]] || rm -rf "$old"
  done
  [[ -z ${download:-} ]] || rm -rf "$download"
}

install_unit() {
  mkdir -p "${UNIT_PATH%/*}"
  print_unit >"$UNIT_PATH.tmp"
  chmod 0644 "$UNIT_PATH.tmp"
  mv -f "$UNIT_PATH.tmp" "$UNIT_PATH"
  log "installed $UNIT_PATH"
}

install_ops_agent() {
  [[ -d $OPS_AGENT_DIR ]] && return 0
  log "installing the Google Cloud Ops Agent (spotrunner-install-ops-agent=true)"
  local script
  script=$(mktemp)
  "$CURL" -sSfL --retry 5 -o "$script" https://dl.google.com/cloudagents/add-google-cloud-ops-agent-repo.sh
  bash "$script" --also-install
  rm -f "$script"
}

# The agent reads a single config.yaml. Ours replaces it only when it is absent, the
# package's comment-only default, or an earlier copy of ours; a custom config is the
# operator's to merge.
install_ops_agent_config() {
  local config=$OPS_AGENT_DIR/config.yaml
  if [[ ! -d $OPS_AGENT_DIR ]]; then
    log "Google Cloud Ops Agent not installed; logs stay in the journal (journalctl -u spotrunner). Set spotrunner-install-ops-agent=true to ship them to Cloud Logging"
    return 0
  fi
  if [[ -f $config ]] && ! grep -qF "$OPS_AGENT_MARKER" "$config" && grep -qvE '^[[:space:]]*(#|$)' "$config"; then
    log "WARNING: $config holds a custom config; merge spotrunner's pipeline into it by hand (startup-script.sh --print-ops-agent-config)"
    return 0
  fi
  if [[ -f $config ]] && print_ops_agent_config | cmp -s - "$config"; then
    return 0
  fi
  print_ops_agent_config >"$config.tmp"
  chmod 0644 "$config.tmp"
  mv -f "$config.tmp" "$config"
  log "installed $config; restarting google-cloud-ops-agent"
  "$SYSTEMCTL" restart google-cloud-ops-agent || log "WARNING: could not restart google-cloud-ops-agent; structured logs start after its next restart"
}

main() {
  case ${1:-} in
    --print-unit) print_unit; return 0 ;;
    --print-ops-agent-config) print_ops_agent_config; return 0 ;;
    "") ;;
    *) die "unknown argument '$1'; usage: startup-script.sh [--print-unit|--print-ops-agent-config]" ;;
  esac
  if [[ -z $INSTALL_ROOT && $(id -u) != 0 ]]; then
    die "must run as root (GCE runs startup scripts as root)"
  fi

  local store source install_ops run_id key
  store=$(metadata spotrunner-store)
  source=$(metadata spotrunner-install)
  [[ -n $store ]] || die "required instance attribute spotrunner-store is missing; set it with: gcloud compute instances add-metadata VM --zone ZONE --metadata spotrunner-store=gs://BUCKET/runs"
  [[ -n $source ]] || die "required instance attribute spotrunner-install is missing; set it to a pip requirement, git+https://...@REF or gs://.../spotrunner-*.whl"
  run_id=$(metadata spotrunner-run-id)
  log "store $store, run id ${run_id:-default}, install $source"

  # The stamp key: what is installed and what this script would write.
  key=$( { printf '%s\n%s\n' "$SCRIPT_VERSION" "$source"; print_unit; print_ops_agent_config; } | sha256sum | cut -c1-16)
  if [[ -f $STAMP && $(<"$STAMP") == "$key" && -x $VENV_LINK/bin/spotrunner ]]; then
    log "already installed ($key); nothing to do, spotrunner.service starts on its own"
    return 0
  fi

  mkdir -p "$PREFIX" "$INSTALL_ROOT/run"
  # One install at a time: an operator rerunning the script while the boot run works.
  exec 9>"$INSTALL_ROOT/run/spotrunner-startup.lock"
  flock -w 900 9 || die "another spotrunner startup script run holds $INSTALL_ROOT/run/spotrunner-startup.lock"

  log "installing ($key)"
  ensure_python
  ensure_user
  install_spotrunner "$source" "$key"
  install_unit
  install_ops=$(metadata spotrunner-install-ops-agent)
  [[ ${install_ops,,} != true ]] || install_ops_agent
  install_ops_agent_config

  "$SYSTEMCTL" daemon-reload
  # --no-block: the start job waits for this script's unit (After=), and blocking
  # here would deadlock; Type=notify makes a blocking start wait for READY=1 too.
  "$SYSTEMCTL" enable --now --no-block spotrunner.service
  if "$SYSTEMCTL" is-active --quiet spotrunner.service; then
    # A rerun with a new install: spotrunner checkpoints, exits 75 and comes back on the new code.
    "$SYSTEMCTL" restart --no-block spotrunner.service
  fi
  printf '%s\n' "$key" >"$STAMP.tmp"
  mv -f "$STAMP.tmp" "$STAMP"
  log "installed spotrunner ($key); check it with: systemctl status spotrunner; journalctl -u spotrunner"
}

main "$@"
