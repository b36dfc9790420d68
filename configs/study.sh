#!/usr/bin/env bash
# The "Does distillation help?" study (README), one dataset per call:
#   MEDKD_DATA=/path/to/medmnist bash configs/study.sh breastmnist [ARM ...]
# ARMs (default: all, in this order): baseline kd-lite0 kd-r18ens kd-mean3 kd-lite0-cf5 baseline-flip
# kd-lite0-flip2 kd-lite0-feat kd-lite0-attn. Every arm is a sweep over the seeds of
# configs/study-$F.toml into runs/study/$F/ARM; a cache that exists is reused and a finished trial
# is skipped, so the command resumes, and two calls with different arms can share a machine (give
# each MEDKD_THREADS=1). MEDKD_SEEDS=0,1,2 runs those seeds instead of the config's.
# Two more arms, not in the default list, repeat the best setting with a ResNet50 student:
# baseline-r50 and kd-mean3-r50 (they need the caches and the ResNet18 baseline of kd-mean3).
# The arm `compare` prints `medkd compare` of every finished arm against the baseline of the same
# augmentation (the `flip` arms against baseline-flip).
set -euo pipefail
USAGE="usage: bash configs/study.sh DATASET [ARM ...]"
KNOWN="baseline kd-lite0 kd-r18ens kd-mean3 kd-lite0-cf5 baseline-flip kd-lite0-flip2 kd-lite0-feat kd-lite0-attn"
EXTRA="baseline-r50 kd-mean3-r50"
F=${1:?$USAGE}
shift
ARMS=${*:-$KNOWN}
CFG=configs/study-$F.toml
for arm in $ARMS; do  # refuse before anything is written
  [[ " $KNOWN $EXTRA compare " == *" $arm "* ]] ||
    { echo "unknown arm '$arm'; known: $KNOWN $EXTRA compare" >&2; exit 2; }
done
[[ -f $CFG ]] || { echo "no study config $CFG; the study has configs/study-breastmnist.toml and configs/study-pneumoniamnist.toml" >&2; exit 2; }
MEDKD=${MEDKD:-medkd}
R=runs/study/$F
C=cache/study
LITE0="--teacher efficientnet_lite0 --teacher-size 112"
T="--threads ${MEDKD_THREADS:-0} --quiet ${MEDKD_SEEDS:+--seed $MEDKD_SEEDS}"
MIX3="--cache $C/${F}_lite0.h5 --cache $C/${F}_lite2.h5 --cache $C/${F}_r18ens.h5 --teacher-weighting mean"

cache() {  # cache NAME [cache-teacher options]: stage one, once
  local out=$C/${F}_$1.h5
  shift
  mkdir -p "$C"
  [[ -f $out ]] || $MEDKD cache-teacher --dataset "$F" --quiet --out "$out" "$@"
}

sweep() {  # sweep ARM [sweep options]
  local arm=$1
  shift
  $MEDKD sweep --config "$CFG" $T --out "$R/$arm" "$@"
}

compare() {  # every finished KD arm against its baseline
  local arm base
  for arm in $KNOWN $EXTRA; do
    [[ $arm == baseline* || ! -d $R/$arm ]] && continue
    base=baseline
    [[ $arm == *flip* ]] && base=baseline-flip
    [[ $arm == *-r50 ]] && base=baseline-r50
    $MEDKD compare "$R/$base" "$R/$arm"
    echo
  done
}

for arm in $ARMS; do
  case $arm in
    baseline) sweep baseline --dataset "$F" --alpha 1 ;;
    baseline-flip) sweep baseline-flip --dataset "$F" --alpha 1 --augment flip ;;
    kd-lite0) cache lite0 $LITE0 && sweep kd-lite0 --cache "$C/${F}_lite0.h5" ;;
    kd-lite0-feat) cache lite0 $LITE0 && sweep kd-lite0-feat --cache "$C/${F}_lite0.h5" --feature-weight 1 ;;
    kd-lite0-cf5) cache lite0-cf5 $LITE0 --cross-fit 5 && sweep kd-lite0-cf5 --cache "$C/${F}_lite0-cf5.h5" ;;
    kd-lite0-attn)  # 30 head epochs: the attention probe costs a hundred times the linear one on a CPU
      cache lite0-attn $LITE0 --head attention --epochs 30 &&
        sweep kd-lite0-attn --cache "$C/${F}_lite0-attn.h5" ;;
    kd-lite0-flip2)  # the teacher's logits on 2 flip views of every training image; students see one a step
      cache lite0-flip2 $LITE0 --views 2 --augment flip && sweep kd-lite0-flip2 --cache "$C/${F}_lite0-flip2.h5" ;;
    kd-r18ens)  # the mean-logit ensemble of the baseline's seeds 0-2
      cache r18ens --teacher "run:$R/baseline/a1_t2_s0,run:$R/baseline/a1_t2_s1,run:$R/baseline/a1_t2_s2" &&
        sweep kd-r18ens --cache "$C/${F}_r18ens.h5" ;;
    kd-mean3)  # Lite0 + Lite2 probes + the ResNet18 ensemble, equal weights over softened distributions
      cache lite0 $LITE0 && cache lite2 --teacher efficientnet_lite2 --teacher-size 112 &&
        sweep kd-mean3 $MIX3 ;;
    baseline-r50) sweep baseline-r50 --dataset "$F" --alpha 1 --student resnet50 ;;
    kd-mean3-r50) sweep kd-mean3-r50 $MIX3 --student resnet50 ;;
    compare) compare ;;
  esac
done
