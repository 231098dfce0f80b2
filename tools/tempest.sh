#!/usr/bin/env bash
# tempest.sh - run Tempest's compute tests against minivan + the Keystone of
# tools/keystone.sh, using only ${MINIVAN_VENV:-REPO/.venv}.
#
#   tools/tempest.sh DIR KEYSTONE_ENV_FILE LIST_FILE [tempest run args...]
#       Makes a tempest workspace in DIR (once), (re)writes DIR/etc/tempest.conf
#       and DIR/etc/accounts.yaml for a Nova-only cloud (pre-provisioned
#       accounts of keystone.sh, no dynamic credentials), then runs
#       `tempest run --include-list LIST_FILE --serial [args...]` in DIR and
#       exits with tempest's status.  LIST_FILE "-" means no include list, e.g.
#   tools/tempest.sh DIR KEYSTONE_ENV_FILE - --list-tests --regex REGEX
#       only lists the test ids REGEX selects (needs no running service).
#
# CINDER_URL in the environment (tools/cinder.sh's env file) turns Cinder on.
# Env knobs: TEMPEST_CONCURRENCY=N (N>1: parallel; the 4 pre-provisioned
# accounts only suffice for one worker, so pair it with
# TEMPEST_DYNAMIC_CREDENTIALS=True, which makes tempest create its own
# projects/users as admin), TEMPEST_ENFORCE_SCOPE_NOVA (True: tempest uses the
# project-reader account for read calls; default False), TEMPEST_MIN_COMPUTE_NODES
# (the compute hosts minivan has; default 1) and TEMPEST_MIGRATION (True: cold and
# live migration tests run; default False).  TEMPEST_GATE=1 configures the cloud of
# tools/gate.sh (with TEMPEST_PUBLIC_NETWORK_ID and TEMPEST_IMAGE_FILE, and
# TEMPEST_ATTACH_ENCRYPTED=True where encrypted volumes attach).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MINIVAN_VENV:-$REPO/.venv}
[[ $# -ge 3 ]] || { sed -n '2,/^set /s/^# \{0,1\}//p' "$0" >&2; exit 2; }
mkdir -p "$1"
DIR=$(cd "$1" && pwd) ENV_FILE=$2 LIST=$3
shift 3
# shellcheck source=/dev/null
source "$ENV_FILE"        # OS_AUTH_URL, OS_PASSWORD, OS_REGION_NAME

if [[ ! -f $DIR/.stestr.conf ]]; then
    # own workspace file: do not register DIR in ~/.tempest/workspace.yaml
    "$VENV/bin/tempest" init --workspace-path "$DIR/workspace.yaml" "$DIR" >/dev/null 2>&1 ||
        { echo "tempest: 'tempest init $DIR' failed" >&2; exit 1; }
fi

# The users/projects made by tools/keystone.sh ("types: admin" marks the
# account tempest hands out as admin).
cat > "$DIR/etc/accounts.yaml" <<EOF
- {username: admin, project_name: admin, password: $OS_PASSWORD,
   user_domain_name: Default, project_domain_name: Default,
   roles: [admin], types: [admin]}
- {username: demo, project_name: demo, password: $OS_PASSWORD,
   user_domain_name: Default, project_domain_name: Default, roles: [member, reader]}
- {username: alt_demo, project_name: alt_demo, password: $OS_PASSWORD,
   user_domain_name: Default, project_domain_name: Default, roles: [member]}
- {username: demo_reader, project_name: demo, password: $OS_PASSWORD,
   user_domain_name: Default, project_domain_name: Default, roles: [reader]}
- {username: demo_manager, project_name: demo, password: $OS_PASSWORD,
   user_domain_name: Default, project_domain_name: Default, roles: [manager, member, reader]}
# a second manager: a class may take one manager as primary and ask for another
- {username: demo_manager2, project_name: demo, password: $OS_PASSWORD,
   user_domain_name: Default, project_domain_name: Default, roles: [manager, member, reader]}
EOF

cat > "$DIR/etc/tempest.conf" <<EOF
[DEFAULT]
log_dir = $DIR/logs
log_file = tempest.log

[oslo_concurrency]
lock_path = $DIR/tempest_lock

[auth]
use_dynamic_credentials = ${TEMPEST_DYNAMIC_CREDENTIALS:-False}
test_accounts_file = $DIR/etc/accounts.yaml
default_credentials_domain_name = Default
create_isolated_networks = False
# classes with force_tenant_isolation (admin/test_quotas*) always use dynamic
# credentials: tempest then creates throw-away projects/users as this admin.
admin_username = admin
admin_password = $OS_PASSWORD
admin_project_name = admin
admin_domain_name = Default

[identity]
uri_v3 = $OS_AUTH_URL
auth_version = v3
region = ${OS_REGION_NAME:-RegionOne}
v3_endpoint_type = public

[identity-feature-enabled]
api_v2 = False
api_v3 = True

[service_available]
nova = True
neutron = False
# glance must be True: tempest 47.0.0's BaseV2ComputeAdminTest.setup_clients
# reads os_admin.image_client_v2 unconditionally, so with glance = False every
# compute admin test class dies in setUpClass (AttributeError).  Tests that
# really use images then fail instead of skipping: keep them out of the list.
glance = True
# Cinder when tools/cinder.sh runs one (CINDER_URL set, e.g. from its env file)
cinder = $([[ -n ${CINDER_URL:-} ]] && echo True || echo False)
swift = False
horizon = False
# not a core tempest option (ignored), kept for plugins/readers
placement = False

[enforce_scope]
nova = ${TEMPEST_ENFORCE_SCOPE_NOVA:-False}

[validation]
run_validation = False

[compute]
region = ${OS_REGION_NAME:-RegionOne}
endpoint_type = publicURL
catalog_type = compute
min_microversion = 2.1
max_microversion = latest
flavor_ref = 1
flavor_ref_alt = 2
image_ref = ${TEMPEST_IMAGE_REF:-}
image_ref_alt = ${TEMPEST_IMAGE_REF_ALT:-${TEMPEST_IMAGE_REF:-}}
build_timeout = 60
min_compute_nodes = ${TEMPEST_MIN_COMPUTE_NODES:-1}

[volume]
catalog_type = volumev3
region = ${OS_REGION_NAME:-RegionOne}
build_timeout = 120
# what Cinder's NFS driver reports, as devstack's NFS jobs tell Tempest
storage_protocol = nfs
vendor_name = Open Source

[volume-feature-enabled]
# Cinder's NFS driver: snapshots of detached volumes only, no backups
backup = False
extend_attached_volume = False

[compute-feature-enabled]
# minivan's scheduler filters (SameHost/DifferentHost beyond Nova's defaults)
scheduler_enabled_filters = AvailabilityZoneFilter,ComputeFilter,ComputeCapabilitiesFilter,ImagePropertiesFilter,ServerGroupAntiAffinityFilter,ServerGroupAffinityFilter,SameHostFilter,DifferentHostFilter
# everything that needs a real guest, console, migration or another service
change_password = True
console_output = True
resize = True
pause = True
shelve = True
shelve_migrate = False
suspend = True
# migrations between the simulated hosts of a minivan with --compute-hosts
cold_migration = ${TEMPEST_MIGRATION:-False}
live_migration = ${TEMPEST_MIGRATION:-False}
block_migration_for_live_migration = False
volume_backed_live_migration = False
rescue = True
stable_rescue = True
snapshot = True
interface_attach = False
attach_encrypted_volume = False
config_drive = False
metadata_service = False
enable_instance_password = True
personality = True
disk_config = True
swap_volume = False
volume_multiattach = False
vnc_console = False
spice_console = False
serial_console = False
EOF

if [[ ${TEMPEST_GATE:-0} == 1 ]]; then
    # tools/gate.sh's cloud: Neutron with its agents, real guests logged into over SSH
    # through floating IPs, Tempest's default timeouts (a later value in the file wins)
    cat >> "$DIR/etc/tempest.conf" <<EOF

[auth]
create_isolated_networks = True

[service_available]
neutron = True

[network]
public_network_id = $TEMPEST_PUBLIC_NETWORK_ID
floating_network_name = public

[network-feature-enabled]
port_security = True
ipv6_subnet_attributes = True
# as devstack: the extensions this Neutron has, so that tests of others skip
api_extensions = ${TEMPEST_NETWORK_EXTENSIONS:-all}

[validation]
run_validation = True
connect_method = floating
auth_method = keypair
image_ssh_user = cirros
image_alt_ssh_user = cirros

[compute]
build_timeout = 300
# devstack's m1.nano and m1.micro
flavor_ref = 42
flavor_ref_alt = 84

[compute-feature-enabled]
# as devstack: a guest without an agent cannot take a new password
change_password = False
# as devstack (it leaves Tempest's default for cold migration: with one compute host
# only the tests that need no second host run)
hostname_fqdn_sanitization = True
cold_migration = True
# LUKS volumes (Cinder and the compute service share a fixed key, as devstack without
# Barbican)
attach_encrypted_volume = ${TEMPEST_ATTACH_ENCRYPTED:-False}
interface_attach = True
config_drive = True
metadata_service = True
vnc_console = True

[volume]
build_timeout = 300
max_microversion = latest

[placement]
max_microversion = latest

[image-feature-enabled]
# as devstack without GLANCE_USE_IMPORT_WORKFLOW
import_image = False
image_format_enforcement = ${GLANCE_ENFORCE_IMAGE_FORMAT:-True}

[scenario]
img_file = $TEMPEST_IMAGE_FILE
img_disk_format = qcow2
img_container_format = bare
EOF
fi

if [[ -n ${TEMPEST_IMAGES_MANIFEST:-} ]]; then
    # os-test-images' corpus (tools/test-images.py), as devstack
    printf '\n[image]\nimages_manifest_file = %s\n' "$TEMPEST_IMAGES_MANIFEST" \
        >> "$DIR/etc/tempest.conf"
fi

args=(--config-file "$DIR/etc/tempest.conf")
[[ $LIST == - ]] || args+=(--include-list "$(realpath "$LIST")")
if [[ ${TEMPEST_CONCURRENCY:-1} -gt 1 ]]; then
    args+=(--concurrency "$TEMPEST_CONCURRENCY")
else
    args+=(--serial)
fi
# account locks left by a killed run would make tempest think every
# pre-provisioned account is taken ("Insufficient number of users")
# (tempest keeps them as files named by an md5 in its lock_path)
rm -rf "$DIR/tempest_lock/test_accounts"
find "$DIR/tempest_lock" -maxdepth 1 -type f -regextype posix-extended \
    -regex '.*/[0-9a-f]{32}' -delete 2>/dev/null || true
cd "$DIR"
exec "$VENV/bin/tempest" run "${args[@]}" "$@"
