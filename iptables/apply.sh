# shellcheck shell=sh
# apply.sh: the only part that runs iptables.
#
# Theory of operation. What we own is recognisable in `iptables-save`
# output: chains named SIDECAR_*, their rules, and the rules in built-in
# chains that jump to them. The rendered rule set (rules.sh) is the target.
# transition() turns "what is installed now" plus "the target" into one
# iptables-restore --noflush input that
#   1. deletes our current jumps from the built-in chains,
#   2. declares every target chain (iptables-restore creates it, or flushes
#      it if it exists), fills it, and hooks the target's jumps in at the
#      place the old jumps had (appended on a first install),
#   3. flushes and deletes our chains the target no longer has,
# and touches nothing else. With an empty target that is the clean-up; with
# our rules as they were before, it is the rollback. On a fresh network
# namespace the input is exactly the dry-run text.
#
# iptables-restore commits each table (*nat ... COMMIT) on its own, and
# IPv4 and IPv6 are separate programs: when anything fails, every family we
# touched is brought back to what it was (rollback()).

# Loaded by lib.sh; redirect.sh, cleanup.sh and lib.sh set the options
# and other globals read here:
# shellcheck disable=SC2154

# for_each_family COMMAND...: `COMMAND... 4`, then `COMMAND... 6` if IPv6
# is on (the variable ipv6).
for_each_family() {
	"$@" 4
	[ "$ipv6" = false ] || "$@" 6
}

# ---------------------------------------------------------------- backends --

# choose_backend: set `backend` (nft, legacy, plain for an iptables that
# only has unsuffixed names, or nft-native) from --backend, or for `auto`
# from what this network namespace already holds: the backend with our
# rules (a re-run), else the iptables backend with more rules of anybody
# (the one the platform uses), else nft (iptables-nft, the default of
# current distributions); nft-native when there is no iptables at all, only
# nft. Dies if the tools are missing.
choose_backend() {
	backend="$opt_backend"
	if [ "$backend" = auto ] && have nft && nft_has_table; then
		backend=nft-native
	elif [ "$backend" = auto ]; then
		_cb_nft=-1 _cb_legacy=-1
		if have iptables-nft-save; then
			count_rules nft
			_cb_nft="$REPLY" _cb_nft_ours="$REPLY_OURS"
		fi
		if have iptables-legacy-save; then
			count_rules legacy
			_cb_legacy="$REPLY" _cb_legacy_ours="$REPLY_OURS"
		fi
		if [ "$_cb_nft" -lt 0 ] && [ "$_cb_legacy" -lt 0 ]; then
			if ! have iptables-save && have nft; then backend=nft-native; else backend=plain; fi
		elif [ "$_cb_nft" -lt 0 ]; then
			backend=legacy
		elif [ "$_cb_legacy" -lt 0 ]; then
			backend=nft
		elif [ "$_cb_legacy_ours" -gt 0 ] && [ "$_cb_nft_ours" -eq 0 ]; then
			backend=legacy
		elif [ "$_cb_nft_ours" -eq 0 ] && [ "$_cb_legacy" -gt "$_cb_nft" ]; then
			backend=legacy
		else
			backend=nft
		fi
	fi
	if [ "$backend" = nft-native ]; then
		have nft || die "nft not found: install nftables (backend nft-native)"
		return 0
	fi
	for_each_family _require_tools
}
_require_tools() {
	tool "$1" save
	have "$REPLY" || die "$REPLY not found: install iptables (backend $backend)"
	tool "$1" restore
	have "$REPLY" || die "$REPLY not found: install iptables (backend $backend)"
}

# count_rules BACKEND: how many rules that backend holds here in both
# families, in REPLY; how many of them are in our chains, in REPLY_OURS.
count_rules() {
	_cr_save=$({
		"iptables-$1-save"
		"ip6tables-$1-save"
	} 2>/dev/null) || true
	REPLY=$(printf '%s\n' "$_cr_save" | grep -c '^-A ' || true)
	REPLY_OURS=$(printf '%s\n' "$_cr_save" | grep -c "^-A $CHAIN_PREFIX" || true)
}

# tool 4|6 save|restore: the program's name, in REPLY.
tool() {
	if [ "$1" = 4 ]; then _tl_base=iptables; else _tl_base=ip6tables; fi
	if [ "$backend" = plain ]; then
		REPLY="$_tl_base-$2"
	else
		REPLY="$_tl_base-$backend-$2"
	fi
}

# ------------------------------------------------------------ save/restore --

# save_rules 4|6 ON_ERROR: `iptables-save` output in REPLY; on failure
# ON_ERROR (die or fail) with the program's own message.
save_rules() {
	tool "$1" save
	_sv_tool="$REPLY"
	# stderr only on failure: iptables-nft-save warns about legacy tables
	if ! REPLY=$("$_sv_tool" 2>/dev/null); then
		_sv_err=$("$_sv_tool" 2>&1 >/dev/null) || true
		"$2" "cannot read the current rules: $_sv_tool: $_sv_err"
	fi
}

# restore_rules 4|6 TEXT: feed TEXT to iptables-restore --noflush. On
# failure, return 1 with the program's message in RESTORE_ERR.
restore_rules() {
	tool "$1" restore
	# --noflush: change only what the input names. --wait: the legacy
	# backend's lock is shared by every namespace of the host; wait for it
	# rather than fail.
	if RESTORE_ERR=$(printf '%s\n' "$2" | "$REPLY" --noflush --wait 2>&1 >/dev/null); then
		return 0
	fi
	RESTORE_ERR="$REPLY failed: $RESTORE_ERR"
	return 1
}

# ----------------------------------------------------------------- ours ----

# is_our_jump LINE: is LINE (an iptables-save rule) a jump from a built-in
# chain into one of ours?
is_our_jump() {
	case "$1" in
	"-A PREROUTING "* | "-A INPUT "* | "-A FORWARD "* | "-A OUTPUT "* | "-A POSTROUTING "*) ;;
	*) return 1 ;;
	esac
	case "$1 " in
	*" -j $CHAIN_PREFIX"*) return 0 ;;
	esac
	return 1
}

# ours_in_save SAVE: only what belongs to us in SAVE (iptables-save output),
# as restore input: per table our chain declarations, our chains' rules and
# our jumps. Tables without anything of ours are left out.
ours_in_save() {
	_os_table='' _os_body=''
	while IFS= read -r _os_line; do
		case "$_os_line" in
		'*'*) _os_table="$_os_line" _os_body='' ;;
		COMMIT)
			[ -z "$_os_body" ] || printf '%s\n%sCOMMIT\n' "$_os_table" "$_os_body"
			_os_body=''
			;;
		":$CHAIN_PREFIX"* | "-A $CHAIN_PREFIX"*) _os_body="$_os_body$_os_line$NL" ;;
		"-A "*) if is_our_jump "$_os_line"; then _os_body="$_os_body$_os_line$NL"; fi ;;
		esac
	done <<EOF_SAVE
$1
EOF_SAVE
}

# table_section TEXT TABLE: the lines between "*TABLE" and its COMMIT.
table_section() {
	_ts_in=false
	while IFS= read -r _ts_line; do
		case "$_ts_line" in
		"*$2") _ts_in=true ;;
		'*'*) _ts_in=false ;;
		COMMIT) _ts_in=false ;;
		*) [ "$_ts_in" = false ] || printf '%s\n' "$_ts_line" ;;
		esac
	done <<EOF_TEXT
$1
EOF_TEXT
}

# table_names TEXT...: the tables named in the TEXTs, each once, in order,
# one per line, in REPLY.
table_names() {
	REPLY=''
	for _tn_text in "$@"; do
		while IFS= read -r _tn_line; do
			case "$_tn_line" in
			'*'*)
				case "$NL$REPLY$NL" in
				*"$NL${_tn_line#\*}$NL"*) ;;
				*) REPLY="${REPLY:+$REPLY$NL}${_tn_line#\*}" ;;
				esac
				;;
			esac
		done <<EOF_TEXT
$_tn_text
EOF_TEXT
	done
}

# jump_position SAVE TABLE CHAIN: the position (1, 2, ...) in CHAIN of our
# first jump there, or nothing.
jump_position() {
	_jp_n=0
	table_section "$1" "$2" | while IFS= read -r _jp_line; do
		case "$_jp_line" in
		"-A $3 "*)
			_jp_n=$((_jp_n + 1))
			if is_our_jump "$_jp_line"; then
				printf '%s\n' "$_jp_n"
				break
			fi
			;;
		esac
	done
}

# ------------------------------------------------------------ transition ---

# transition SAVE TARGET: the restore input that takes our part of SAVE (the
# current iptables-save output) to TARGET (restore input naming only our
# objects). Nothing at all when there is nothing to do.
transition() {
	_tr_save="$1" _tr_target="$2"
	_tr_ours=$(ours_in_save "$_tr_save")
	table_names "$_tr_target" "$_tr_ours"
	while IFS= read -r _tr_table; do
		[ -z "$_tr_table" ] || _transition_table "$_tr_table"
	done <<EOF_TABLES
$REPLY
EOF_TABLES
}

_transition_table() {
	_tt_ours=$(table_section "$_tr_ours" "$1")
	_tt_target=$(table_section "$_tr_target" "$1")
	printf '*%s\n' "$1"

	# 1. unhook: our current jumps out of the built-in chains
	while IFS= read -r _tt_line; do
		if is_our_jump "$_tt_line"; then printf -- '-D %s\n' "${_tt_line#-A }"; fi
	done <<EOF_OURS
$_tt_ours
EOF_OURS

	# 2. the target; a jump goes where the old one was, so that re-running
	#    keeps our place among other people's rules
	while IFS= read -r _tt_line; do
		[ -n "$_tt_line" ] || continue
		if is_our_jump "$_tt_line"; then
			_tt_rest="${_tt_line#-A }"
			_tt_chain="${_tt_rest%% *}"
			_tt_pos=$(jump_position "$_tr_save" "$1" "$_tt_chain")
			if [ -n "$_tt_pos" ]; then
				printf -- '-I %s %s %s\n' "$_tt_chain" "$_tt_pos" "${_tt_rest#* }"
				continue
			fi
		fi
		printf '%s\n' "$_tt_line"
	done <<EOF_TARGET
$_tt_target
EOF_TARGET

	# 3. our chains the target does not have: flush them all, then delete
	#    (a chain can only go once nothing jumps to it)
	_tt_flush='' _tt_delete=''
	while IFS= read -r _tt_line; do
		case "$_tt_line" in
		":$CHAIN_PREFIX"*)
			_tt_chain="${_tt_line#:}"
			_tt_chain="${_tt_chain%% *}"
			case "$NL$_tt_target$NL" in
			*"$NL:$_tt_chain "*) ;;
			*)
				_tt_flush="$_tt_flush-F $_tt_chain$NL"
				_tt_delete="$_tt_delete-X $_tt_chain$NL"
				;;
			esac
			;;
		esac
	done <<EOF_OURS
$_tt_ours
EOF_OURS
	printf '%s%sCOMMIT\n' "$_tt_flush" "$_tt_delete"
}

# --------------------------------------------------------------- rollback --

# without_comments TEXT: TEXT less its # lines (iptables-save stamps the
# time into them), in REPLY.
without_comments() {
	REPLY=$(printf '%s\n' "$1" | grep -v '^#' || true)
}

# rollback_family 4|6 BEFORE: bring our part of the family back to BEFORE
# (its iptables-save output before we started), and remove the tables this
# run created (drop_emptied_tables). A family whose rules are unchanged is
# left alone. Returns 1 with RESTORE_ERR on failure.
rollback_family() {
	save_rules "$1" fail
	without_comments "$REPLY"
	_rb_now="$REPLY"
	without_comments "$2"
	_rb_before="$REPLY"
	[ "$_rb_now" != "$_rb_before" ] || return 0
	_rb_input=$(transition "$_rb_now" "$(ours_in_save "$_rb_before")")
	if [ -n "$_rb_input" ]; then
		restore_rules "$1" "$_rb_input" || return 1
	fi
	table_names "$_rb_now"
	_rb_tables="$REPLY"
	table_names "$_rb_before"
	_rb_had="$NL$REPLY$NL" _rb_new=''
	while IFS= read -r _rb_table; do
		case "$_rb_had" in
		*"$NL$_rb_table$NL"*) ;;
		*) _rb_new="$_rb_new$_rb_table$NL" ;;
		esac
	done <<EOF_TABLES
$_rb_tables
EOF_TABLES
	drop_emptied_tables "$1" "$_rb_new"
}

# ----------------------------------------------------------- empty tables --

# drop_emptied_tables 4|6 TABLES: with the nft backend, delete each of the
# TABLES (names, one per line) that holds nothing any more: no rule and no
# chain of anybody's, only built-in chains with the default policy. Such a
# table does nothing, but iptables-save shows it, and iptables (which
# creates a table on first use) has no way to remove one; nft does. Called
# for the tables our rules were in (clean-up) and those a failed run
# created (rollback), so that the rules are as they were found. The legacy
# backend's tables live as long as the network namespace: nothing removes
# them.
drop_emptied_tables() {
	[ "$backend" = nft ] && [ -n "$2" ] || return 0
	save_rules "$1" fail
	_de_save="$REPLY"
	if [ "$1" = 4 ]; then _de_family=ip; else _de_family=ip6; fi
	while IFS= read -r _de_table; do
		case "$NL$_de_save$NL" in
		*"$NL*$_de_table$NL"*) ;;
		*) continue ;; # not there (or an empty line)
		esac
		_de_rest=$(table_section "$_de_save" "$_de_table" | grep -v '^:[A-Z]* ACCEPT ' || true)
		[ -z "$_de_rest" ] || continue
		if ! have nft; then
			warn "the table $_de_family $_de_table is empty now but stays: removing it needs nft"
			continue
		fi
		_de_err=$(nft delete table "$_de_family" "$_de_table" 2>&1) ||
			warn "the empty table $_de_family $_de_table stays: nft delete table failed: $_de_err"
	done <<EOF_TABLES
$2
EOF_TABLES
}
