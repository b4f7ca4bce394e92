"""The host baseline we hold the hardening role to: our own test set modelled on dev-sec's linux-baseline
and ssh-baseline (the controls that apply to a Debian 12 appliance), with waivers and their reasons.

Two consumers: tests/ops/test_baseline.py checks the booted container (effective sshd settings, network
sysctls, file modes, module blacklist, unattended-upgrades origins, needrestart, auditd.conf), and
tests/ops/test_hardening_render.py checks the rendered templates for what a container cannot show
(kernel sysctls, audit rules, mount options). docs/security.md lists the same waivers.
"""

from __future__ import annotations

# linux-baseline sysctl-* controls. Network ones are per network namespace (checked live in the container).
NET_SYSCTLS: dict[str, str] = {
    "net.ipv4.ip_forward": "0",
    "net.ipv6.conf.all.forwarding": "0",
    "net.ipv4.conf.all.rp_filter": "1",
    "net.ipv4.conf.default.rp_filter": "1",
    "net.ipv4.icmp_echo_ignore_broadcasts": "1",
    "net.ipv4.icmp_ignore_bogus_error_responses": "1",
    "net.ipv4.icmp_ratelimit": "100",
    "net.ipv4.icmp_ratemask": "88089",
    "net.ipv4.tcp_syncookies": "1",
    "net.ipv4.tcp_rfc1337": "1",
    "net.ipv4.conf.all.arp_ignore": "1",
    "net.ipv4.conf.all.arp_announce": "2",
    "net.ipv4.conf.all.shared_media": "1",
    "net.ipv4.conf.default.shared_media": "1",
    "net.ipv4.conf.all.accept_source_route": "0",
    "net.ipv4.conf.default.accept_source_route": "0",
    "net.ipv4.conf.all.accept_redirects": "0",
    "net.ipv4.conf.default.accept_redirects": "0",
    "net.ipv4.conf.all.secure_redirects": "0",
    "net.ipv4.conf.default.secure_redirects": "0",
    "net.ipv4.conf.all.send_redirects": "0",
    "net.ipv4.conf.default.send_redirects": "0",
    "net.ipv4.conf.all.log_martians": "1",
    "net.ipv4.conf.default.log_martians": "1",
    "net.ipv6.conf.all.accept_redirects": "0",
    "net.ipv6.conf.default.accept_redirects": "0",
    "net.ipv6.conf.all.accept_source_route": "0",
    "net.ipv6.conf.default.accept_source_route": "0",
    "net.ipv6.conf.default.router_solicitations": "0",
    "net.ipv6.conf.default.accept_ra_rtr_pref": "0",
    "net.ipv6.conf.default.accept_ra_pinfo": "0",
    "net.ipv6.conf.default.accept_ra_defrtr": "0",
    "net.ipv6.conf.default.autoconf": "0",
    "net.ipv6.conf.default.dad_transmits": "0",
    "net.ipv6.conf.default.max_addresses": "1",
}
# Kernel-wide ones: the host kernel's, not settable in a container (rendered-config check only).
KERNEL_SYSCTLS: dict[str, str] = {
    "kernel.randomize_va_space": "2",
    "kernel.kptr_restrict": "2",
    "kernel.dmesg_restrict": "1",
    "kernel.sysrq": "0",
    "kernel.core_uses_pid": "1",
    "kernel.yama.ptrace_scope": "1",
    "kernel.kexec_load_disabled": "1",
    "kernel.unprivileged_bpf_disabled": "1",
    "kernel.perf_event_paranoid": "3",
    "kernel.unprivileged_userns_clone": "0",
    "fs.suid_dumpable": "0",
    "fs.protected_hardlinks": "1",
    "fs.protected_symlinks": "1",
    "fs.protected_fifos": "2",
    "fs.protected_regular": "2",
    "vm.mmap_min_addr": "65536",
    "vm.mmap_rnd_bits": "32",
    "vm.mmap_rnd_compat_bits": "16",
    "dev.tty.ldisc_autoload": "0",
    "net.core.bpf_jit_harden": "2",
}
# dev-sec controls we deliberately do not apply (reason in docs/security.md, "Waivers").
WAIVED_SYSCTLS: dict[str, str] = {
    "net.ipv6.conf.all.disable_ipv6": "IPv6 callers and Janus ICE over IPv6 are wanted",
    "net.ipv4.tcp_timestamps": "PAWS/RTT on long-lived HTTPS and TURN-over-TLS; offsets are per-connection "
                               "random since Linux 4.10, so no uptime leak",
}

# ssh-baseline: effective values (`sshd -T`).
SSHD: dict[str, str] = {
    "permitrootlogin": "no",
    "passwordauthentication": "no",
    "kbdinteractiveauthentication": "no",
    "permitemptypasswords": "no",
    "pubkeyauthentication": "yes",
    "hostbasedauthentication": "no",
    "ignorerhosts": "yes",
    "strictmodes": "yes",
    "maxauthtries": "3",
    "logingracetime": "30",
    "clientaliveinterval": "300",
    "clientalivecountmax": "2",
    "usedns": "no",
    "compression": "no",
    "x11forwarding": "no",
    "allowtcpforwarding": "no",
    "allowagentforwarding": "no",
    "allowstreamlocalforwarding": "no",
    "permittunnel": "no",
    "permituserenvironment": "no",
    "gatewayports": "no",
    "loglevel": "VERBOSE",
}
WEAK_SSH = ("cbc", "arcfour", "3des", "hmac-md5", "hmac-sha1", "diffie-hellman-group1-", "group14-sha1",
            "ssh-dss")

# linux-baseline os-* file permissions: path -> (max mode, owner, group)
FILE_MODES: dict[str, tuple[int, str, str]] = {
    "/etc/shadow": (0o640, "root", "shadow"),
    "/etc/gshadow": (0o640, "root", "shadow"),
    "/etc/passwd": (0o644, "root", "root"),
    "/etc/group": (0o644, "root", "root"),
    "/etc/ssh/sshd_config": (0o644, "root", "root"),
    "/etc/nftables.conf": (0o600, "root", "root"),
}

MODULES = ("cramfs", "freevxfs", "jffs2", "hfs", "hfsplus", "udf", "dccp", "sctp", "rds", "tipc",
           "usb-storage")
MOUNTS = {"/tmp": {"nosuid", "nodev", "noexec"}, "/dev/shm": {"nosuid", "nodev", "noexec"},
          "/var/tmp": {"nosuid", "nodev", "noexec"}}
AUDITD_CONF = {"max_log_file_action": "keep_logs", "space_left_action": "syslog",
               "admin_space_left_action": "suspend", "disk_full_action": "suspend",
               "disk_error_action": "suspend", "action_mail_acct": "root"}
# linux-baseline audit controls: what must be watched (path or syscall) by some rule
AUDIT_WATCHES = ("/etc/passwd", "/etc/shadow", "/etc/group", "/etc/sudoers", "/etc/ssh/sshd_config",
                 "/etc/voice-appliance/", "/etc/nftables.conf", "init_module", "settimeofday")
