# shellcheck shell=sh
# apply_nft.sh: the only part that runs nft, for the nft-native backend.
#
# Our rules are one table, `inet sidecar_proxy` (nft.sh writes it), and
# nothing else: other people's tables, also those of iptables-nft, are
# never named. Installing replaces the table whole with one `nft -f`, which
# the kernel applies as one transaction: all of it or none of it. So a
# failure needs no rollback of the rules (only of the method's set-up), and
# a re-run, or --reconcile, swaps old for new with no moment in between.
# Clean-up deletes the table: `nft list ruleset` is then as it was.

# Loaded by lib.sh; redirect.sh, cleanup.sh and lib.sh set the options
# and other globals read here:
# shellcheck disable=SC2154

# nft_has_table: does this network namespace hold our table?
nft_has_table() {
	nft list table "$NFT_FAMILY" "$NFT_TABLE" >/dev/null 2>&1
}

# nft_listing: our table as `nft list table` prints it, in REPLY (empty if
# there is none).
nft_listing() {
	REPLY=$(nft list table "$NFT_FAMILY" "$NFT_TABLE" 2>/dev/null) || REPLY=''
}

# nft_run TEXT: feed TEXT to nft -f, one transaction. On failure, return 1
# with nft's error (its first line, which has the place and the reason) in
# RESTORE_ERR.
nft_run() {
	if RESTORE_ERR=$(printf '%s\n' "$1" | nft -f - 2>&1 >/dev/null); then
		return 0
	fi
	_nr_first=$(printf '%s\n' "$RESTORE_ERR" | sed -n '/Error/{p;q;}')
	RESTORE_ERR="nft -f failed: ${_nr_first:-$RESTORE_ERR}"
	return 1
}

# nft_install: the method's set-up, then our table in one transaction. On
# failure the table is as it was; the set-up of this run is undone.
nft_install() {
	_ni_target=$(nft_input)
	method_prepare
	if ! nft_run "$_ni_target"; then
		routes_rollback
		method_rollback
		fail "$RESTORE_ERR; rolled back, the rules are as they were"
	fi
}

# nft_cleanup: delete our table if it is there (--dry-run: say so), and
# the one validate.sh adds for a moment if a killed run left it.
nft_cleanup() {
	if nft list table inet sidecar_proxy_validate >/dev/null 2>&1; then
		if [ "$opt_dry_run" = true ]; then
			printf '# would delete the table validate.sh left: inet sidecar_proxy_validate\n'
		else
			nft delete table inet sidecar_proxy_validate 2>/dev/null || true
		fi
	fi
	nft_has_table || return 0
	_nc_input="delete table $NFT_FAMILY $NFT_TABLE"
	if [ "$opt_dry_run" = true ]; then
		printf '# ==== sidecar-proxy removal, backend nft-native ====\n%s\n' "$_nc_input"
		return 0
	fi
	nft_run "$_nc_input" || fail "$RESTORE_ERR"
}
