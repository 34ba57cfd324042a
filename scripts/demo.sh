#!/usr/bin/env bash
# make demo: a small ext4 volume, a full backup, changes, an incremental, list, verify, restore.
set -euo pipefail
W="${DEMO_DIR:-build/demo}"
rm -rf "$W"; mkdir -p "$W/mnt"
VOL="$W/volume.img"; REPO="$W/repo"; MNT="$W/mnt"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() { mountpoint -q "$MNT" && umount "$MNT" || true; }
trap cleanup EXIT
[ "$(id -u)" -eq 0 ] || { echo "make demo loop-mounts an ext4 image: run it as root" >&2; exit 1; }

say "a 256 MiB ext4 volume with some files"
truncate -s 256M "$VOL"
mkfs.ext4 -q -F -L demo "$VOL"
mount -o loop "$VOL" "$MNT"
cp -r /usr/share/doc "$MNT/doc" 2>/dev/null || true
head -c 40M /dev/urandom > "$MNT/random.bin"
(cd "$MNT" && find . -type f -exec sha256sum {} + | sort -k2) > "$W/before.sha256"
umount "$MNT"
df_used=$(du -sh --apparent-size "$VOL" | cut -f1); echo "volume: $VOL ($df_used)"

say "full backup"
imagechain backup "$VOL" "$REPO" --chain daily --init

say "change some files, then an incremental backup"
mount -o loop "$VOL" "$MNT"
head -c 2M /dev/urandom > "$MNT/new-file.bin"
rm -rf "$MNT/doc/$(ls "$MNT/doc" | head -1)"
dd if=/dev/urandom of="$MNT/random.bin" bs=1M count=1 seek=10 conv=notrunc status=none
(cd "$MNT" && find . -type f -exec sha256sum {} + | sort -k2) > "$W/after.sha256"
umount "$MNT"
imagechain backup "$VOL" "$REPO" --chain daily

say "list"
imagechain list "$REPO"

say "verify (every block digest, every chain link)"
imagechain verify "$REPO"

say "restore the full point (yesterday) and the latest point (today)"
imagechain restore "$REPO::daily@0" "$W/restored-0.img"
imagechain restore "$REPO::daily@latest" "$W/restored-1.img"
cmp "$VOL" "$W/restored-1.img" && echo "latest point is bit-identical to the volume"
e2fsck -fn "$W/restored-0.img" >/dev/null && echo "e2fsck: point 0 is clean"
mount -o loop,ro "$W/restored-0.img" "$MNT"
(cd "$MNT" && find . -type f -exec sha256sum {} + | sort -k2) | diff -q - "$W/before.sha256" \
  && echo "point 0 holds exactly the files as they were before the changes"
umount "$MNT"

say "delta restore: roll the volume back to point 0, writing only what differs"
imagechain restore "$REPO::daily@0" "$VOL" --delta
cmp "$VOL" "$W/restored-0.img" && echo "volume rolled back bit-exact"

say "the repository"
find "$REPO" -type f | sort
echo; echo "demo files are in $W"
