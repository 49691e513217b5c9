#!/usr/bin/env bash
# Downloads a captioning dataset and lays it out as caption-train and scripts/evaluate.sh read it.
#
#   scripts/get_dataset.sh clotho    ROOT [--splits development,validation,evaluation]
#   scripts/get_dataset.sh audiocaps ROOT [--splits train,val,test] [--jobs 4] [--timeout 120]
#   scripts/get_dataset.sh coco      ROOT [--splits train2014,val2014]
#
# Layouts (docs/training.md):
#   clotho     ROOT/clotho_captions_SPLIT.csv, ROOT/clotho_metadata_SPLIT.csv, audio in ROOT/SPLIT/
#              (Clotho v2.1, Zenodo record 4783391; archives checked against their published MD5)
#   audiocaps  ROOT/SPLIT.csv, audio in ROOT/SPLIT/YOUTUBEID_STARTTIME.flac: the 10 s of each clip,
#              fetched with yt-dlp (bounded time per video, --jobs at once) and cut by FFmpeg.
#              Videos that are gone are listed in ROOT/SPLIT_missing.csv and tried again next run.
#   coco       ROOT/dataset_coco.json (Karpathy's split), images in ROOT/train2014/, ROOT/val2014/
#
# Idempotent: what is complete is kept; a download that broke off resumes (HTTP ranges) or
# restarts; a file whose checksum does not match is deleted and the run fails (exit 2) naming it.
# Downloads go to ROOT/downloads/ (kept, so that a rerun needs no network; delete to save space).
#
# Sources can be overridden (mirrors, offline tests): PREFIXCAP_CLOTHO_URL,
# PREFIXCAP_AUDIOCAPS_CSV_URL, PREFIXCAP_YOUTUBE_URL, PREFIXCAP_COCO_IMAGES_URL,
# PREFIXCAP_COCO_KARPATHY_URL, PREFIXCAP_YTDLP (the yt-dlp to run), and
# PREFIXCAP_DATASET_MD5 (an `md5sum`-format file replacing the built-in checksums).
set -euo pipefail

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-1}"; }

# One AudioCaps clip (run by xargs): OUT_DIR TIMEOUT TMP MISSING_FILE ID START
if [[ "${1:-}" == "--one-audiocaps-clip" ]]; then
  shift
  out_dir=$1 timeout_s=$2 tmp=$3 missing=$4 id=$5 start=$6
  out="$out_dir/${id}_${start}.flac"
  [[ -s "$out" ]] && exit 0
  work=$(mktemp -d "$tmp/clip.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  ytdlp=${PREFIXCAP_YTDLP:-yt-dlp}
  url="${PREFIXCAP_YOUTUBE_URL:-https://www.youtube.com/watch?v=}$id"
  if ! log=$(timeout "$timeout_s" "$ytdlp" --quiet --no-warnings --no-playlist -f bestaudio/best \
                 -o "$work/source.%(ext)s" "$url" 2>&1); then
    reason=$(printf '%s' "$log" | tr '\n,' '  ' | cut -c1-200)
    [[ -z "$reason" ]] && reason="yt-dlp failed or took longer than ${timeout_s} s"
    printf '%s,%s,%s\n' "$id" "$start" "$reason" >> "$missing"
    exit 0
  fi
  source=$(find "$work" -name 'source.*' | head -n 1)
  if [[ -z "$source" ]] ||
     ! ffmpeg -nostdin -loglevel error -y -ss "$start" -t 10 -i "$source" -vn -c:a flac "$work/clip.flac" ||
     [[ ! -s "$work/clip.flac" ]]; then
    printf '%s,%s,%s\n' "$id" "$start" "the download has no audio at ${start} s" >> "$missing"
    exit 0
  fi
  mv "$work/clip.flac" "$out"
  exit 0
fi

[[ $# -ge 2 ]] || usage
kind=$1 root=$2
shift 2
splits="" jobs=4 timeout_s=120
while [[ $# -gt 0 ]]; do
  case "$1" in
    --splits) splits=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "get_dataset.sh: unknown option $1" >&2; usage ;;
  esac
done
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || { echo "get_dataset.sh: --jobs must be a positive number" >&2; exit 1; }
[[ "$timeout_s" =~ ^[1-9][0-9]*$ ]] || { echo "get_dataset.sh: --timeout must be whole seconds" >&2; exit 1; }

need() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "get_dataset.sh: '$tool' is missing (scripts/setup.sh installs it)" >&2; exit 1; }
  done
}
need curl md5sum

mkdir -p "$root/downloads"
root=$(cd "$root" && pwd)
downloads="$root/downloads"

# Published checksums: Clotho v2.1 (Zenodo record 4783391), COCO 2014 images.
builtin_md5="
c8b05bc7acdb13895bb3c6a29608667e  clotho_audio_development.7z
7dba730be08bada48bd15dc4e668df59  clotho_audio_validation.7z
4569624ccadf96223f19cb59fe4f849f  clotho_audio_evaluation.7z
d4090b39ce9f2491908eebf4d5b09bae  clotho_captions_development.csv
5879e023032b22a2c930aaa0528bead4  clotho_captions_validation.csv
1b16b9e57cf7bdb7f13a13802aeb57e2  clotho_captions_evaluation.csv
170d20935ecfdf161ce1bb154118cda5  clotho_metadata_development.csv
2e010427c56b1ce6008b0f03f41048ce  clotho_metadata_validation.csv
13946f054d4e1bf48079813aac61bf77  clotho_metadata_evaluation.csv
0da8c0bd3d6becc4dcb32757491aca88  train2014.zip
a3d79f5ed8d289b7a7554ce06a5782b3  val2014.zip
"
expected_md5() {  # FILE NAME -> its checksum, or nothing when none is published
  local table=$builtin_md5
  [[ -n "${PREFIXCAP_DATASET_MD5:-}" ]] && table=$(cat "$PREFIXCAP_DATASET_MD5")
  printf '%s\n' "$table" | awk -v f="$1" '$2 == f { print $1; exit }'
}

# fetch URL NAME: downloads/NAME, resumed when the server allows it, checked when a checksum is known.
fetch() {
  local url=$1 name=$2 dest="$downloads/$2" md5 got
  md5=$(expected_md5 "$name")
  if [[ -s "$dest" ]]; then
    if [[ -z "$md5" || -e "$dest.verified" ]]; then return 0; fi
  else
    echo "get_dataset.sh: downloading $name"
    local rc=0
    curl -fL --retry 3 --retry-delay 2 -sS -C - -o "$dest.part" "$url" || rc=$?
    if [[ $rc -eq 33 || $rc -eq 36 ]]; then  # the server cannot resume: start over
      rm -f "$dest.part"
      rc=0
      curl -fL --retry 3 --retry-delay 2 -sS -o "$dest.part" "$url" || rc=$?
    fi
    if [[ $rc -ne 0 ]]; then
      echo "get_dataset.sh: could not download $url (curl exit $rc); rerun to resume" >&2
      exit 2
    fi
    mv "$dest.part" "$dest"
  fi
  if [[ -n "$md5" ]]; then
    got=$(md5sum "$dest" | cut -d' ' -f1)
    if [[ "$got" != "$md5" ]]; then
      rm -f "$dest" "$dest.verified"
      echo "get_dataset.sh: $name is corrupt: MD5 $got, expected $md5 (deleted; rerun to download it again)" >&2
      exit 2
    fi
    touch "$dest.verified"
  fi
}

case "$kind" in
clotho)
  need 7z
  base=${PREFIXCAP_CLOTHO_URL:-https://zenodo.org/records/4783391/files}
  [[ -z "$splits" ]] && splits=development,validation,evaluation
  for split in ${splits//,/ }; do
    case "$split" in development|validation|evaluation) ;; *) echo "get_dataset.sh: Clotho has no split '$split'" >&2; exit 1 ;; esac
    for f in "clotho_captions_$split.csv" "clotho_metadata_$split.csv" "clotho_audio_$split.7z"; do
      fetch "$base/$f" "$f"
    done
    cp -f "$downloads/clotho_captions_$split.csv" "$downloads/clotho_metadata_$split.csv" "$root/"
    if [[ ! -e "$root/.$split.extracted" ]]; then
      echo "get_dataset.sh: extracting clotho_audio_$split.7z"
      tmp=$(mktemp -d "$root/.extract.XXXXXX")
      7z x -y -bd -o"$tmp" "$downloads/clotho_audio_$split.7z" >/dev/null ||
        { rm -rf "$tmp"; echo "get_dataset.sh: clotho_audio_$split.7z does not extract" >&2; exit 2; }
      mkdir -p "$root/$split"
      find "$tmp" -type f -iname '*.wav' -exec mv -f {} "$root/$split/" \;
      rm -rf "$tmp"
      touch "$root/.$split.extracted"
    fi
    echo "get_dataset.sh: clotho $split: $(find "$root/$split" -type f | wc -l) audio files in $root/$split"
  done
  ;;
audiocaps)
  need ffmpeg timeout xargs
  command -v "${PREFIXCAP_YTDLP:-yt-dlp}" >/dev/null ||
    { echo "get_dataset.sh: yt-dlp is missing (apt-get install yt-dlp, or PREFIXCAP_YTDLP=/path/to/yt-dlp)" >&2; exit 1; }
  base=${PREFIXCAP_AUDIOCAPS_CSV_URL:-https://raw.githubusercontent.com/cdjkim/audiocaps/master/dataset}
  [[ -z "$splits" ]] && splits=train,val,test
  for split in ${splits//,/ }; do
    case "$split" in train|val|test) ;; *) echo "get_dataset.sh: AudioCaps has no split '$split'" >&2; exit 1 ;; esac
    fetch "$base/$split.csv" "audiocaps_$split.csv"
    cp -f "$downloads/audiocaps_$split.csv" "$root/$split.csv"
    mkdir -p "$root/$split"
    missing="$root/${split}_missing.csv"
    echo "youtube_id,start_time,reason" > "$missing"
    tmp=$(mktemp -d "$root/.clips.XXXXXX")
    # audiocap_id,youtube_id,start_time,caption: one line per distinct clip
    tail -n +2 "$root/$split.csv" | tr -d '\r' | awk -F, 'NF >= 3 && $2 != "" { print $2 " " int($3) }' | sort -u |
      xargs -P "$jobs" -n 2 "$0" --one-audiocaps-clip "$root/$split" "$timeout_s" "$tmp" "$missing" || true
    rm -rf "$tmp"
    clips=$(tail -n +2 "$root/$split.csv" | tr -d '\r' | awk -F, 'NF >= 3 && $2 != "" { print $2 " " int($3) }' | sort -u | wc -l)
    gone=$(($(wc -l < "$missing") - 1))
    echo "get_dataset.sh: audiocaps $split: $((clips - gone)) of $clips clips in $root/$split; $gone unavailable (listed in $missing)"
  done
  ;;
coco)
  need unzip
  images=${PREFIXCAP_COCO_IMAGES_URL:-http://images.cocodataset.org/zips}
  karpathy=${PREFIXCAP_COCO_KARPATHY_URL:-https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip}
  [[ -z "$splits" ]] && splits=train2014,val2014
  fetch "$karpathy" caption_datasets.zip
  if [[ ! -s "$root/dataset_coco.json" ]]; then
    unzip -t -q "$downloads/caption_datasets.zip" >/dev/null ||
      { rm -f "$downloads/caption_datasets.zip"; echo "get_dataset.sh: caption_datasets.zip is corrupt (deleted; rerun)" >&2; exit 2; }
    unzip -o -q -j "$downloads/caption_datasets.zip" dataset_coco.json -d "$root"
  fi
  for split in ${splits//,/ }; do
    case "$split" in train2014|val2014) ;; *) echo "get_dataset.sh: COCO 2014 has no image set '$split'" >&2; exit 1 ;; esac
    fetch "$images/$split.zip" "$split.zip"
    if [[ ! -e "$root/.$split.extracted" ]]; then
      echo "get_dataset.sh: extracting $split.zip"
      unzip -o -q "$downloads/$split.zip" -d "$root" ||
        { echo "get_dataset.sh: $split.zip does not extract" >&2; exit 2; }
      touch "$root/.$split.extracted"
    fi
    echo "get_dataset.sh: coco $split: $(find "$root/$split" -type f | wc -l) images in $root/$split"
  done
  ;;
*)
  echo "get_dataset.sh: unknown dataset '$kind' (clotho, audiocaps, coco)" >&2
  exit 1
  ;;
esac
