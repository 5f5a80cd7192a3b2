#!/bin/sh
# One-shot job of the compose stack (service `bundle`): click log -> prepared data -> trained run -> bundle.
#
# Each build goes to a new version folder, then the `current` symlink is switched in one rename, so a
# worker that (re)starts always loads a complete bundle:
#   $BUNDLES_DIR/<version>/        the bundle        $BUNDLES_DIR/current -> <version>
#   $WORK_DIR/<version>/data, run  data and run      $WORK_DIR/current    -> <version>
#
# Settings (environment):
#   BUNDLES_DIR   [/srv/bundles]  where bundles go (the workers read $BUNDLES_DIR/current)
#   WORK_DIR      [/srv/data]     where prepared data and training runs go
#   PREPARE_ARGS  []              arguments of `streamrec data prepare` (without --out) for a real click log,
#                                 e.g. "--format yoochoose --train /srv/clicks/train.dat --test /srv/clicks/test.dat";
#                                 empty: a synthetic log from `streamrec data synth`
#   SYNTH_ARGS    []              extra arguments of `streamrec data synth`, e.g. "--items 5000 --sessions 50000"
#   MODEL         [gru4rec]       `streamrec train --model`
#   TRAIN_ARGS    [--epochs 3]    extra arguments of `streamrec train`
#   EXPORT_ARGS   []              extra arguments of `streamrec export`, e.g. "--int8"
#   REBUILD       [0]             1: build a new version even when a current bundle exists
set -eu

bundles_dir=${BUNDLES_DIR:-/srv/bundles}
work_dir=${WORK_DIR:-/srv/data}
model=${MODEL:-gru4rec}
train_args=${TRAIN_ARGS---epochs 3}  # set but empty: no extra arguments

if [ -f "$bundles_dir/current/manifest.json" ] && [ "${REBUILD:-0}" != 1 ]; then
  echo "bundle exists: $(readlink "$bundles_dir/current") (set REBUILD=1 to build a new one)"
  exit 0
fi

version=$(date -u +%Y%m%dT%H%M%SZ)-$model
data=$work_dir/$version/data
run=$work_dir/$version/run
mkdir -p "$work_dir/$version" "$bundles_dir"

# Word splitting of the *_ARGS settings is intended: each holds several command-line arguments.
# shellcheck disable=SC2086
if [ -n "${PREPARE_ARGS:-}" ]; then
  streamrec data prepare $PREPARE_ARGS --out "$data"
else
  streamrec data synth --out "$data" ${SYNTH_ARGS:-}
fi
# shellcheck disable=SC2086
streamrec train --model "$model" --data "$data" --out "$run" $train_args
# shellcheck disable=SC2086
streamrec export --run "$run" --out "$bundles_dir/$version" ${EXPORT_ARGS:-}

switch_current() {  # $1 folder, $2 target name inside it
  ln -sfn "$2" "$1/.current.tmp"
  mv -T "$1/.current.tmp" "$1/current"
}
switch_current "$work_dir" "$version"
switch_current "$bundles_dir" "$version"
echo "bundle ready: $bundles_dir/$version (now $bundles_dir/current)"
