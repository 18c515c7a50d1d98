#!/usr/bin/env bash
# Single-node SLURM cluster for the test suite (Debian 12 / slurm-wlm 22.05).
#
#   tests/slurm/cluster.sh start    install (if needed), configure, start, wait until idle
#   tests/slurm/cluster.sh stop     kill the daemons this script started
#   tests/slurm/cluster.sh status   sinfo + squeue
#   tests/slurm/cluster.sh env      print `export SLURM_CONF=...` (eval-able)
#
# Everything lives in the state dir ${SLURM_TEST_DIR:-/tmp/sae-audit-slurm}:
#   etc/slurm.conf etc/gres.conf   generated configuration
#   state/ spool/ run/              StateSaveLocation, SlurmdSpoolDir, daemon pid files
#   log/                            slurmctld.log slurmd.log munged.log
#   pids/                           PIDs of the daemons *this script* started
#   dev/nvidia0                     stand-in GPU device file (gres.conf File=)
#   jobcomp.log                     one line per finished job (JobCompType=jobcomp/filetxt)
#
# Config discovery: the daemons are started with SLURM_CONF=<state>/etc/slurm.conf.
# Client commands (sbatch/squeue/sinfo/scontrol, and the `srun` that the snakemake
# jobstep plugin runs *inside* each job) must find the same file. Relying on
# SLURM_CONF alone is fragile: every process in the chain (pytest -> snakemake ->
# sbatch -> job -> srun) would have to inherit it, and if `scontrol show config`
# fails the slurm executor plugin silently falls back from squeue to sacct,
# which fails without an accounting DB and the workflow hangs. So we ALSO
# symlink /etc/slurm/slurm.conf and /etc/slurm/gres.conf (the compiled-in
# default location) to the generated files -- but only if those paths are absent
# or symlinks (ours, or stale ones); a real site config file is never
# overwritten (then SLURM_CONF must be exported:
# `eval "$(tests/slurm/cluster.sh env)"`). `stop` removes our symlinks again.
# Only one test cluster can run at a time (fixed ports 6817/6818); `start`
# refuses to start a second one.
#
# No accounting DB: `sacct`/`sacctmgr`/`sshare` do not work. Finished jobs stay
# visible in `squeue --states=all` for MinJobAge=600 s and are recorded forever
# in <state>/jobcomp.log (JobId=.. UserId=.. Name=<job name> JobState=COMPLETED ...).
set -euo pipefail

STATE_DIR="${SLURM_TEST_DIR:-/tmp/sae-audit-slurm}"
ETC="$STATE_DIR/etc"
CONF="$ETC/slurm.conf"
GRES_CONF="$ETC/gres.conf"
PIDS="$STATE_DIR/pids"
LOGS="$STATE_DIR/log"
NODE="$(hostname -s)"
WAIT_S="${SLURM_TEST_WAIT_S:-60}"
SYS_CONF_DIR=/etc/slurm
MUNGE_KEY=/etc/munge/munge.key
MUNGE_SOCKET_DIR=/run/munge

export SLURM_CONF="$CONF"

log() { echo "[slurm-test] $*" >&2; }

pid_alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

recorded_pid() { cat "$PIDS/$1.pid" 2>/dev/null || true; }

# alive AND still the daemon we started (guards against PID reuse after a reboot
# or a crash: `stop` must never kill an unrelated process)
daemon_running() {
    local pid
    pid="$(recorded_pid "$1")"
    pid_alive "$pid" && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$1" ]]
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }


install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    log "installing slurm-wlm + munge via apt-get (non-interactive)"
    local t0=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    # apt-get update only if the package is unknown to the local index
    if ! apt-cache show slurm-wlm >/dev/null 2>&1; then
        apt-get update -qq >/dev/null
    fi
    # Debian's postinst tries to start the services via invoke-rc.d; in a
    # container this is refused (policy-rc.d) or fails harmlessly -- we start
    # the daemons ourselves below.
    if ! apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        slurm-wlm munge >"$STATE_DIR/apt-install.log" 2>&1; then
        cat "$STATE_DIR/apt-install.log" >&2
        log "apt-get install failed"
        exit 1
    fi
    log "apt-get install took $((SECONDS - t0)) s"
}

ensure_munge_key() {
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating munge key $MUNGE_KEY"
        mkdir -p "$(dirname "$MUNGE_KEY")"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge "$(dirname "$MUNGE_KEY")" "$MUNGE_KEY"
    chmod 0700 "$(dirname "$MUNGE_KEY")"
    chmod 0400 "$MUNGE_KEY"
}

write_config() {
    local cpus mem_total headroom real_mem def_mem
    cpus="$(nproc)"
    mem_total="$(free -m | awk '/^Mem:/{print $2}')"
    # leave 10 % (at least 512 MB) to the OS so slurmd never sees less memory
    # than configured (that would drain the node)
    headroom=$((mem_total / 10))
    ((headroom < 512)) && headroom=512
    real_mem=$((mem_total - headroom))
    ((real_mem < 256)) && real_mem=256
    # jobs submitted without --mem get this per CPU instead of the whole node
    def_mem=$((real_mem / cpus / 4))
    ((def_mem < 64)) && def_mem=64

    mkdir -p "$ETC" "$STATE_DIR"/{state,spool,run,dev} "$LOGS" "$PIDS"
    # stand-in GPU. slurmd rejects a plain file ("... is not a valid character
    # or block device, fix your gres.conf") and then never sets
    # CUDA_VISIBLE_DEVICES; it stat()s File= (following symlinks), so a symlink
    # to /dev/null passes without mknod/CAP_MKNOD. The trailing digit of the
    # path is the device index that ends up in CUDA_VISIBLE_DEVICES.
    ln -sfn /dev/null "$STATE_DIR/dev/nvidia0"

    cat >"$CONF" <<EOF
# generated by tests/slurm/cluster.sh -- single-node test cluster
ClusterName=saeaudit
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none

# no cgroups (containers / gVisor have no usable cgroup fs)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# (AccountingStorageTRES=gres/gpu would put GPUs into jobcomp's Tres=, but
#  slurmctld 22.05 then dies: "slurmdbd is required to run with TRES gres/gpu")
# finished-job history without a DB: one line per job incl. its name
JobCompType=jobcomp/filetxt
JobCompLoc=${STATE_DIR}/jobcomp.log

SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=${def_mem}
# reject what can never run at submit time instead of pending forever
EnforcePartLimits=ALL

# keep finished jobs in squeue long enough for snakemake's squeue status check
MinJobAge=600
ReturnToService=2
SlurmdTimeout=120
SlurmctldTimeout=120
InactiveLimit=0
KillWait=10
MessageTimeout=20
# trust the node description below even if slurmd detects a different topology
SlurmdParameters=config_overrides

StateSaveLocation=${STATE_DIR}/state
SlurmdSpoolDir=${STATE_DIR}/spool
SlurmctldPidFile=${STATE_DIR}/run/slurmctld.pid
SlurmdPidFile=${STATE_DIR}/run/slurmd.pid
SlurmctldLogFile=${LOGS}/slurmctld.log
SlurmdLogFile=${LOGS}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info

GresTypes=gpu
NodeName=${NODE} NodeAddr=127.0.0.1 NodeHostname=${NODE} CPUs=${cpus} RealMemory=${real_mem} Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF

    cat >"$GRES_CONF" <<EOF
# generated by tests/slurm/cluster.sh -- stand-in GPU (no real device behind it)
AutoDetect=off
NodeName=${NODE} Name=gpu File=${STATE_DIR}/dev/nvidia0
EOF
}

link_system_conf() {
    mkdir -p "$SYS_CONF_DIR"
    local name target link
    for name in slurm.conf gres.conf; do
        target="$ETC/$name"
        link="$SYS_CONF_DIR/$name"
        if [[ -L $link || ! -e $link ]]; then
            # absent, or a symlink (ours, or a stale one from another state dir)
            ln -sfn "$target" "$link"
        else
            log "WARNING: $link is a real file; not touching it -- clients need SLURM_CONF=$CONF"
        fi
    done
}

unlink_system_conf() {
    local name link
    for name in slurm.conf gres.conf; do
        link="$SYS_CONF_DIR/$name"
        if [[ -L $link && "$(readlink "$link")" == "$ETC/$name" ]]; then
            rm -f "$link"
        fi
    done
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munged() {
    if daemon_running munged; then return 0; fi
    if munge_works; then
        log "using already running munged"
        return 0
    fi
    mkdir -p "$MUNGE_SOCKET_DIR" /var/lib/munge /var/log/munge
    chown munge:munge "$MUNGE_SOCKET_DIR" /var/lib/munge /var/log/munge
    chmod 0755 "$MUNGE_SOCKET_DIR"
    # setpriv execs (no fork), setsid too when not a group leader -> $! is munged
    setsid setpriv --reuid=munge --regid=munge --init-groups \
        /usr/sbin/munged --foreground --force \
        </dev/null >>"$LOGS/munged.log" 2>&1 &
    echo $! >"$PIDS/munged.pid"
    local i
    for ((i = 0; i < 50; i++)); do
        munge_works && return 0
        sleep 0.2
    done
    return 1
}

start_daemon() { # name, command...
    local name=$1
    shift
    if daemon_running "$name"; then return 0; fi
    # own session, stdio detached: the caller (pytest subprocess with captured
    # output) must not wait on our pipes, and its signals must not reach us
    setsid "$@" </dev/null >>"$LOGS/$name.stdout" 2>&1 &
    echo $! >"$PIDS/$name.pid"
}

node_state() { sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n1; }

dump_logs() {
    local f
    for f in "$LOGS"/*; do
        [[ -f $f ]] || continue
        echo "===== $f (last 60 lines) =====" >&2
        tail -n 60 "$f" >&2
    done
}

all_running() {
    daemon_running slurmctld && daemon_running slurmd \
        && { daemon_running munged || munge_works; }
}

print_pids() {
    local d
    for d in munged slurmctld slurmd; do
        echo "$d pid=$(recorded_pid "$d")"
    done
    echo "SLURM_CONF=$CONF"
}

cmd_start() {
    mkdir -p "$STATE_DIR" "$PIDS" "$LOGS"
    if all_running && [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing) ]]; then
        log "already running (node $NODE: $(node_state))"
        print_pids
        return 0
    fi
    local t0=$SECONDS
    install_packages
    ensure_munge_key
    if ! daemon_running slurmctld && ! daemon_running slurmd; then
        local port
        for port in 6817 6818; do
            if port_in_use "$port"; then
                log "port $port is already in use (another slurmctld/slurmd, e.g. a different SLURM_TEST_DIR?); not starting"
                exit 1
            fi
        done
        write_config
    fi
    link_system_conf

    if ! start_munged; then
        log "munged did not come up"
        dump_logs
        cmd_stop >/dev/null 2>&1 || true
        exit 1
    fi
    start_daemon slurmctld env SLURM_CONF="$CONF" /usr/sbin/slurmctld -D -i
    # give the controller a moment so slurmd's registration is not refused
    local i
    for ((i = 0; i < 50; i++)); do
        scontrol ping 2>/dev/null | grep -q 'is UP' && break
        daemon_running slurmctld || break
        sleep 0.2
    done
    start_daemon slurmd env SLURM_CONF="$CONF" /usr/sbin/slurmd -D

    local state="" resumed=0 deadline=$((SECONDS + WAIT_S))
    while ((SECONDS < deadline)); do
        if ! daemon_running slurmctld || ! daemon_running slurmd; then
            log "a daemon exited during startup"
            break
        fi
        state="$(node_state)"
        case "$state" in
        idle | mixed | allocated | completing)
            log "node $NODE is $state after $((SECONDS - t0)) s"
            print_pids
            return 0
            ;;
        down* | drain* | inval*)
            # stale state from a previous run / config change
            if ((resumed == 0)); then
                scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
                resumed=1
            fi
            ;;
        esac
        sleep 1
    done
    log "cluster did not become ready within ${WAIT_S} s (node state: '${state}')"
    if daemon_running slurmctld; then
        sinfo -N -l >&2 2>&1 || true
        scontrol show node "$NODE" >&2 2>&1 || true
    fi
    dump_logs
    cmd_stop >/dev/null 2>&1 || true
    exit 1
}

cancel_all_jobs() {
    # our private cluster: cancel everything so no slurmstepd/job processes
    # outlive slurmd (they would otherwise keep running after `stop`)
    local ids i
    ids="$(squeue -h -o '%A' -t PENDING,RUNNING,SUSPENDED,CONFIGURING 2>/dev/null || true)"
    [[ -n $ids ]] || return 0
    # shellcheck disable=SC2086
    scancel $ids 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do
        [[ -z "$(squeue -h -o '%A' -t PENDING,RUNNING,SUSPENDED,CONFIGURING,COMPLETING 2>/dev/null)" ]] && break
        sleep 0.5
    done
}

cmd_stop() {
    local d pid i
    if daemon_running slurmctld; then cancel_all_jobs; fi
    for d in slurmd slurmctld munged; do
        pid="$(recorded_pid "$d")"
        if daemon_running "$d"; then
            kill -TERM "$pid" 2>/dev/null || true
            for ((i = 0; i < 100; i++)); do
                pid_alive "$pid" || break
                sleep 0.1
            done
            if pid_alive "$pid"; then
                log "$d ($pid) ignored SIGTERM; sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
                sleep 0.2
            fi
            echo "stopped $d (pid $pid)"
        fi
        rm -f "$PIDS/$d.pid"
    done
    unlink_system_conf
}

cmd_status() {
    local d rc=0
    for d in munged slurmctld slurmd; do
        if daemon_running "$d"; then
            echo "$d: running (pid $(recorded_pid "$d"))"
        else
            echo "$d: not running"
            [[ $d == munged ]] && munge_works && echo "  (an external munged answers)"
        fi
    done
    sinfo || rc=$?
    squeue --states=all || rc=$?
    return "$rc"
}

require_root() {
    if [[ $(id -u) -ne 0 ]]; then
        log "must run as root (installs packages, writes /etc/slurm, runs munged/slurmd)"
        exit 1
    fi
}

case "${1:-}" in
start) require_root && cmd_start ;;
stop) require_root && cmd_stop ;;
status) cmd_status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*)
    echo "usage: $0 {start|stop|status|env}" >&2
    exit 2
    ;;
esac
