#!/usr/bin/env bash
# Regenerate loadtest/corpus: espeak-ng speech (English and Mandarin, several voices), 16 kHz
# mono PCM WAV, one utterance per file, with transcripts.tsv (file<TAB>text). Needs Debian's
# espeak-ng and sox. Any folder of WAVs with such a transcripts.tsv works as a corpus too.
set -euo pipefail
out="$(dirname "$0")/corpus"
rm -f "$out"/*.wav "$out"/transcripts.tsv
mkdir -p "$out"
en=(
  "Turn on the kitchen light please"
  "What is the weather like tomorrow morning"
  "Set a timer for ten minutes"
  "Play some quiet music in the living room"
  "Remind me to call my sister at six"
  "How long does it take to drive to the airport"
)
zh=(
  "今天天气怎么样"
  "请把客厅的灯打开"
  "明天早上七点叫我起床"
  "播放一首轻松的音乐"
)
n=0
say() {  # voice, text
  n=$((n + 1)); f=$(printf "%03d.wav" "$n")
  espeak-ng -v "$1" -s 160 -w /tmp/corpus_raw.wav "$2"
  # trim leading/trailing silence so each file is speech only; the load tool adds the pauses
  sox /tmp/corpus_raw.wav -r 16000 -c 1 -b 16 "$out/$f" silence 1 0.02 1% reverse silence 1 0.02 1% reverse
  printf "%s\t%s\n" "$f" "$2" >> "$out/transcripts.tsv"
}
for v in en-us en-us+f2 en-gb+m3 en-us+klatt; do for t in "${en[@]}"; do say "$v" "$t"; done; done
for v in cmn cmn+f2; do for t in "${zh[@]}"; do say "$v" "$t"; done; done
echo "$n utterances in $out"
