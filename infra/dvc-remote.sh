#!/usr/bin/env bash
# Point this project's DVC at an S3 (or S3-compatible: MinIO, Ceph...) remote, as the default.
#
#   DVC_REMOTE_URL=s3://dvc/detr-ops infra/dvc-remote.sh                  # AWS S3
#   DVC_REMOTE_URL=s3://dvc/detr-ops DVC_REMOTE_ENDPOINT=http://127.0.0.1:9000 infra/dvc-remote.sh
#   make dvc-remote DVC_REMOTE_URL=...                                    # the same
#
# Variables:
#   DVC_REMOTE_URL       s3://bucket/prefix (required)
#   DVC_REMOTE_NAME      remote name (default: storage)
#   DVC_REMOTE_ENDPOINT  endpoint of an S3-compatible server; unset for AWS. Leave it unset too
#                        when the endpoint differs between machines (the compose stack's MinIO is
#                        127.0.0.1:9000 on the host, minio:9000 in the worker): then each machine
#                        sets AWS_ENDPOINT_URL in its environment, which DVC's S3 client reads.
#   DVC_REMOTE_REGION    region (optional; MinIO accepts any, e.g. us-east-1)
#   DVC_REMOTE_SCOPE     project (default: .dvc/config, committed, shared with the team) or
#                        local (.dvc/config.local, git-ignored, this checkout only)
#
# Credentials never go into DVC's config files, committed or local: DVC's S3 client reads them
# from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or AWS_PROFILE and
# ~/.aws/credentials, or an instance role). The script refuses to run if a config file already
# holds a secret for the remote. Re-running it updates the remote in place (idempotent).
set -euo pipefail

die() { echo "dvc-remote: $*" >&2; exit 2; }

url=${DVC_REMOTE_URL:-}
name=${DVC_REMOTE_NAME:-storage}
scope=${DVC_REMOTE_SCOPE:-project}
[[ -n $url ]] || die "DVC_REMOTE_URL is not set (e.g. DVC_REMOTE_URL=s3://dvc/detr-ops)"
[[ $url =~ ^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$ ]] \
  || die "DVC_REMOTE_URL=$url: expected s3://<bucket>[/<prefix>] with a valid bucket name"
[[ $name =~ ^[A-Za-z0-9_-]+$ ]] || die "DVC_REMOTE_NAME=$name: letters, digits, - and _ only"
case $scope in
  project) level=() ;;
  local) level=(--local) ;;
  *) die "DVC_REMOTE_SCOPE=$scope: expected project or local" ;;
esac
if [[ -n ${DVC_REMOTE_ENDPOINT:-} && ! ${DVC_REMOTE_ENDPOINT} =~ ^https?://[^/@[:space:]]+/?$ ]]; then
  die "DVC_REMOTE_ENDPOINT=${DVC_REMOTE_ENDPOINT}: expected http(s)://host[:port] (no credentials)"
fi

DVC=${DVC:-dvc}
command -v "$DVC" >/dev/null || die "'$DVC' not found: run 'make install' and use .venv/bin/dvc"
root=$("$DVC" root 2>/dev/null) || die "not inside a DVC project (run it from the repository)"
cd "$root"

for file in .dvc/config .dvc/config.local; do
  if [[ -f $file ]] && grep -Eiq '^[[:space:]]*(secret_access_key|access_key_id|session_token)[[:space:]]*=' "$file"; then
    die "$file holds S3 credentials: remove them (dvc remote modify --unset) and use the environment"
  fi
done

"$DVC" remote add "${level[@]}" --force --default "$name" "$url"
if [[ -n ${DVC_REMOTE_ENDPOINT:-} ]]; then
  "$DVC" remote modify "${level[@]}" "$name" endpointurl "$DVC_REMOTE_ENDPOINT"
else
  "$DVC" remote modify "${level[@]}" --unset "$name" endpointurl
fi
if [[ -n ${DVC_REMOTE_REGION:-} ]]; then
  "$DVC" remote modify "${level[@]}" "$name" region "$DVC_REMOTE_REGION"
fi

echo "dvc-remote: '$name' -> $url${DVC_REMOTE_ENDPOINT:+ (endpoint $DVC_REMOTE_ENDPOINT)}, default, $scope config"
if [[ -z ${AWS_ACCESS_KEY_ID:-} && -z ${AWS_PROFILE:-} ]]; then
  echo "dvc-remote: note: no AWS_ACCESS_KEY_ID / AWS_PROFILE in this environment; set them" \
       "(e.g. from infra/.env) before 'dvc push' / 'dvc pull'" >&2
fi
