# shellcheck shell=sh
# method cgroup: the proxy's process sits in a cgroup of its own, and
# packets of sockets created there are not captured (the cgroup match,
# xt_cgroup; iptables >= 1.6). No privilege in the proxy. Two forms:
#
#   net_cls (cgroup v1, the default): the cgroup's net_cls.classid is
#     ISTIO_NET_CLS_ID, matched with `-m cgroup --cgroup CLASSID`. This script
#     creates the cgroup (--cgroup-dir, mounting the net_cls hierarchy on its
#     parent if nothing is mounted there), writes the classid, and hands the
#     cgroup's `tasks` and `cgroup.procs` to the proxy's UID, so that the
#     unprivileged proxy can put itself in when it starts
#     (`sidecar-proxy run --cgroup DIR`), after every restart too.
#   cgroup v2 (--cgroup-path PATH): `-m cgroup --path PATH`, PATH relative to
#     the cgroup2 root. The kernel looks PATH up when the rule is installed,
#     so it must exist by then; this script creates nothing for it.
#
# A socket belongs to the cgroup its creator was in when it was created: the
# proxy must join the cgroup before it opens any upstream connection.
# Interface: load_method in lib.sh.

# Loaded by load_method (lib.sh); redirect.sh, cleanup.sh and lib.sh set
# the options and other globals read here:
# shellcheck disable=SC2154

method_validate() {
	if [ -n "$opt_cgroup_path" ]; then
		check_safe_word --cgroup-path "$opt_cgroup_path"
		return 0
	fi
	check_cgroup_options
	check_id --proxy-uid "$opt_proxy_uid"
	[ "$opt_dry_run" = true ] && return 0
	grep -q '^net_cls[[:space:]]' /proc/cgroups 2>/dev/null ||
		die "--method cgroup: this kernel has no net_cls cgroup controller (use --cgroup-path with cgroup v2)"
	# method_prepare creates the cgroup and, if need be, the hierarchy root
	# above it, but nothing further up
	[ -d "${opt_cgroup_dir%/*}" ] || [ -d "${opt_cgroup_dir%/*/*}" ] ||
		die "--cgroup-dir: $opt_cgroup_dir: ${opt_cgroup_dir%/*/*} does not exist"
	_cg_check_mount_point "${opt_cgroup_dir%/*}"
}

# _cg_check_mount_point ROOT: ROOT (the parent of --cgroup-dir) is a net_cls
# hierarchy already, or a place where mounting one hides nothing: missing
# (method_prepare creates it) or an empty directory, not a mount point of
# something else, and not inside a cgroup file system (a directory there is
# a cgroup of that hierarchy, not a place for another one). Dies otherwise.
_cg_check_mount_point() {
	is_net_cls_root "$1" && return 0
	if [ -e "$1" ]; then
		[ -d "$1" ] || die "--cgroup-dir: $1 is not a directory"
		mount_at "$1"
		[ -z "$REPLY" ] ||
			die "--cgroup-dir: $1 is a mount point (${REPLY%% *}), not a net_cls hierarchy: refusing to mount over it"
		for _cg_entry in "$1"/* "$1"/.[!.]* "$1"/..?*; do
			[ -e "$_cg_entry" ] || [ -L "$_cg_entry" ] || continue
			die "--cgroup-dir: $1 is not empty and holds no net_cls hierarchy: refusing to mount over it (that would hide what is in it)"
		done
	fi
	mount_below "$1"
	case "$REPLY" in
	cgroup | cgroup2)
		die "--cgroup-dir: $1 is inside a $REPLY file system ($REPLY_AT): a directory there is a cgroup of that hierarchy, not a place to mount net_cls (use an existing net_cls hierarchy, a directory elsewhere such as /run/sidecar-proxy/net_cls, or --cgroup-path on cgroup v2)"
		;;
	esac
}

method_output_bypass() {
	if [ -n "$opt_cgroup_path" ]; then
		why "The proxy's own connections come from the cgroup v2 $opt_cgroup_path: they go out as they are, which keeps them from looping back into the proxy."
		rule SIDECAR_OUTPUT "proxy own traffic, cgroup $opt_cgroup_path" RETURN "cgroup-path=$opt_cgroup_path"
	else
		_cg_hex=$(printf '0x%x' "$cgroup_classid")
		why "The proxy's own connections come from the net_cls cgroup $opt_cgroup_dir, classid $_cg_hex ($cgroup_classid); UID $opt_proxy_uid may put itself in. They go out as they are, which keeps them from looping back into the proxy."
		rule SIDECAR_OUTPUT "proxy own traffic, net_cls classid $_cg_hex" RETURN "classid=$cgroup_classid"
	fi
}

method_own_traffic() {
	if [ -n "$opt_cgroup_path" ]; then
		"$1" "cgroup $opt_cgroup_path" "cgroup-path=$opt_cgroup_path"
	else
		"$1" "net_cls classid $(printf '0x%x' "$cgroup_classid")" "classid=$cgroup_classid"
	fi
}

# method_check_backend BACKEND: nft resolves a cgroup v2 path itself, below
# /sys/fs/cgroup (the kernel does it for iptables): with nft-native that
# must be the cgroup2 file system, which on a host with the hybrid layout
# (cgroup v1 controllers, cgroup2 at /sys/fs/cgroup/unified) it is not.
method_check_backend() {
	[ "$1" = nft-native ] && [ -n "$opt_cgroup_path" ] || return 0
	mount_at /sys/fs/cgroup
	case "$REPLY" in
	'cgroup2 '*) ;;
	*) die "--cgroup-path: nft looks the path up below /sys/fs/cgroup, which is not the cgroup2 file system here (${REPLY%% *}${REPLY:+ is mounted there}); use --backend nft or legacy, or mount cgroup2 there" ;;
	esac
}

# What method_prepare did in this run, for method_rollback.
_cg_made_root=false _cg_mounted=false _cg_made_dir=false
# The source names of the net_cls mounts redirect.sh makes (the first field
# of /proc/self/mounts): on a directory that was there, and on one it made.
CG_SOURCE=sidecar-proxy
CG_SOURCE_MADE_DIR=sidecar-proxy+dir

method_prepare() {
	[ -z "$opt_cgroup_path" ] || return 0
	_cg_root="${opt_cgroup_dir%/*}"
	if ! is_net_cls_root "$_cg_root"; then
		if [ ! -d "$_cg_root" ]; then
			_cg_err=$(mkdir "$_cg_root" 2>&1) || fail "cannot create $_cg_root: $_cg_err"
			_cg_made_root=true
		fi
		# the mount's source names it ours, and whether we made its directory:
		# cleanup.sh unmounts only such a mount (method_cleanup)
		if [ "$_cg_made_root" = true ]; then _cg_source="$CG_SOURCE_MADE_DIR"; else _cg_source="$CG_SOURCE"; fi
		_cg_err=$(mount -t cgroup -o net_cls "$_cg_source" "$_cg_root" 2>&1) ||
			_cg_prepare_failed "cannot mount the net_cls hierarchy on $_cg_root: $_cg_err"
		_cg_mounted=true
	fi
	if [ ! -d "$opt_cgroup_dir" ]; then
		_cg_err=$(mkdir "$opt_cgroup_dir" 2>&1) ||
			_cg_prepare_failed "cannot create the cgroup $opt_cgroup_dir: $_cg_err"
		_cg_made_dir=true
	fi
	_cg_err=$( (printf '%s\n' "$cgroup_classid" >"$opt_cgroup_dir/net_cls.classid") 2>&1) ||
		_cg_prepare_failed "cannot write $opt_cgroup_dir/net_cls.classid: $_cg_err"
	_cg_err=$(chown "$opt_proxy_uid" "$opt_cgroup_dir/tasks" "$opt_cgroup_dir/cgroup.procs" 2>&1) ||
		_cg_prepare_failed "cannot hand $opt_cgroup_dir to UID $opt_proxy_uid: $_cg_err"
}

_cg_prepare_failed() {
	method_rollback
	fail "$1"
}

# method_rollback: undo exactly what method_prepare did in this run.
method_rollback() {
	[ "$_cg_made_dir" = false ] || rmdir "$opt_cgroup_dir" 2>/dev/null || true
	[ "$_cg_mounted" = false ] || umount "$_cg_root" 2>/dev/null || true
	[ "$_cg_made_root" = false ] || rmdir "$_cg_root" 2>/dev/null || true
}

# method_cleanup: undo what an earlier run set up. The cgroup at
# --cgroup-dir goes if its classid is ours; then the net_cls mount on its
# parent goes if redirect.sh made it (its source name says so), and with it
# the directory if redirect.sh made that too. Unmounting removes a view of
# the hierarchy, not its cgroups (other cgroups of the machine's one net_cls
# hierarchy live on). Tolerant: what is missing is fine; a busy cgroup (a
# process is still in it) is left with a warning, and its mount with it, so
# that a later clean-up can finish the job.
method_cleanup() {
	if [ -f "$opt_cgroup_dir/net_cls.classid" ]; then
		read -r _cg_current <"$opt_cgroup_dir/net_cls.classid" || _cg_current=''
		if [ "$_cg_current" != "$cgroup_classid" ]; then
			warn "$opt_cgroup_dir has classid $_cg_current, not ours ($cgroup_classid): left in place"
			return 0
		fi
		if [ "$opt_dry_run" = true ]; then
			printf '# would remove the net_cls cgroup %s\n' "$opt_cgroup_dir"
		elif ! rmdir "$opt_cgroup_dir" 2>/dev/null; then
			warn "$opt_cgroup_dir is still in use (a process is in it): left in place"
			return 0
		fi
	fi
	_cg_root="${opt_cgroup_dir%/*}"
	mount_at "$_cg_root"
	case "$REPLY" in
	"cgroup $CG_SOURCE" | "cgroup $CG_SOURCE_MADE_DIR") ;;
	*) return 0 ;; # not a mount of ours: somebody else's, or none
	esac
	if [ "$opt_dry_run" = true ]; then
		printf '# would unmount the net_cls hierarchy redirect.sh mounted on %s\n' "$_cg_root"
		return 0
	fi
	_cg_err=$(umount "$_cg_root" 2>&1) || fail "cannot unmount $_cg_root: $_cg_err"
	[ "$REPLY" != "cgroup $CG_SOURCE_MADE_DIR" ] || rmdir "$_cg_root" 2>/dev/null ||
		warn "$_cg_root: the directory redirect.sh made for the mount is not empty: left in place"
}

# is_net_cls_root DIR: is a net_cls cgroup hierarchy mounted on DIR?
is_net_cls_root() {
	_nr_dir=$(cd "$1" 2>/dev/null && pwd -P) || return 1
	while read -r _nr_src _nr_mnt _nr_type _nr_opts _nr_rest; do
		if [ "$_nr_type" = cgroup ] && [ "$_nr_mnt" = "$_nr_dir" ]; then
			case ",$_nr_opts," in
			*,net_cls,*) return 0 ;;
			esac
		fi
	done </proc/self/mounts
	return 1
}

# mount_at DIR: "TYPE SOURCE" of the last mount on DIR (the one in view), in
# REPLY; empty if nothing is mounted there.
mount_at() {
	REPLY=''
	_ma_dir=$(cd "$1" 2>/dev/null && pwd -P) || return 0
	while read -r _ma_src _ma_mnt _ma_type _ma_rest; do
		[ "$_ma_mnt" != "$_ma_dir" ] || REPLY="$_ma_type $_ma_src"
	done </proc/self/mounts
}

# mount_below PATH: the type of the file system PATH (or, if it does not
# exist, its nearest existing ancestor) lies in, in REPLY; its mount point in
# REPLY_AT.
mount_below() {
	_mb_path="$1"
	until _mb_dir=$(cd "$_mb_path" 2>/dev/null && pwd -P); do
		_mb_path="${_mb_path%/*}"
		[ -n "$_mb_path" ] || _mb_path=/
	done
	REPLY='' REPLY_AT=''
	while read -r _mb_src _mb_mnt _mb_type _mb_rest; do
		case "$_mb_dir/" in
		"${_mb_mnt%/}"/*)
			# the longest (and, for equals, the last) mount point wins
			[ "${#_mb_mnt}" -lt "${#REPLY_AT}" ] || REPLY="$_mb_type" REPLY_AT="$_mb_mnt"
			;;
		esac
	done </proc/self/mounts
}
