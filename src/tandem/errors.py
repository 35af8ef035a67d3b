"""The one exception tree of tandem.

Each class's docstring is its message template (``str.format`` fields filled from the
keyword arguments given at raise time) and ends with the fix. Each class carries the HTTP
status the API answers with and the exit code the CLI ends with. Foreign exceptions are
translated into these at the boundary (``raise ... from exc``).
"""

from __future__ import annotations

from typing import Any, ClassVar


class TandemError(Exception):
    """Something went wrong in tandem: {detail}"""

    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str | None = None, /, **fields: Any) -> None:
        self.fields = fields
        if message is None:
            template = (type(self).__doc__ or "{detail}").strip()
            template = " ".join(template.split())
            try:
                message = template.format(**fields)
            except (KeyError, IndexError):
                message = template
        self.message = message
        super().__init__(message)

    @property
    def code(self) -> str:
        """A stable machine-readable name for the error (the class name)."""
        return type(self).__name__


# --- usage and input -------------------------------------------------------------------


class InvalidInput(TandemError):
    """Invalid input: {detail}. Correct the value and try again."""

    http_status = 422
    exit_code = 2


class ConfirmationRequired(TandemError):
    """This operation destroys or replaces data and needs the typed confirmation(s) {expected}.
    Repeat the request with --confirm {example}."""

    http_status = 422
    exit_code = 1


class ConfirmationOutOfOrder(ConfirmationRequired):
    """The typed confirmations answer warnings given one after the other: type {expected}.
    Repeat the request with --confirm {example}."""


class NotFound(TandemError):
    """{what} {name!r} does not exist. List the existing ones with `tandem {listing}`."""

    http_status = 404


class AlreadyExists(TandemError):
    """{what} {name!r} already exists. Choose another name or remove the existing one first."""

    http_status = 409


class Conflict(TandemError):
    """{detail}"""

    http_status = 409


class NotExported(TandemError):
    """Image {image} is not presented as an NBD export. Present it first, e.g. with
    `tandem mount {image} --host HOST --action map-only`."""

    http_status = 409


class InvalidTransition(TandemError):
    """Application {app!r} is {state}; {operation} is not allowed in that state.
    Allowed operations now: {allowed}."""

    http_status = 409


# --- authentication ---------------------------------------------------------------------


class Unauthorized(TandemError):
    """The token is missing or wrong. Pass a valid token with --token or TANDEM_TOKEN."""

    http_status = 401


class Forbidden(TandemError):
    """Role {role!r} may not {action}. Use a token with the {needed} role."""

    http_status = 403


class NotPaired(Forbidden):
    """This appliance is not paired with {peer!r}: a peer token acts only for the appliance
    paired here. Pair with it (`tandem peer add`), or remove the token (`tandem token
    remove {token}`)."""


class MirrorRecord(TandemError):
    """Application {app!r} here is a mirror of {origin!r}'s app: its host and path are
    production's, named by the other site, and this appliance never acts on them ({action}
    refused). {fix}"""

    http_status = 409


class PeerRefused(TandemError):
    """The peer {peer!r} may not {action} application {app!r} now: {reason}. {fix}"""

    http_status = 409


class TargetInUse(TandemError):
    """The application {other!r} registered at {site} at host {host!r}, path {path!r} is
    {why}: a failback never writes over an app in service. Fail back onto a location
    registered for it at {site} (`tandem app add NAME --host H --path P --kind {kind}`:
    unprotected, without images), or with --target original."""

    http_status = 409


class PeerApplyFailed(TandemError):
    """The peer {peer} could not apply image {image} ({job} {status}: {reason}); the DR copy
    is unchanged. Read that job's log on {peer} (`tandem job log {job}`), fix what it
    says, then run the failback again or undo it."""

    http_status = 502


class PeerApplyTimedOut(TandemError):
    """The peer {peer}'s restore job {job} of image {image} did not end within {seconds:g}
    s; the DR copy is unchanged. Follow it on {peer} (`tandem job show {job}`) and run the
    failback again once it has ended, or undo it."""

    http_status = 504


class TargetNotRegistered(TandemError):
    """No application of kind {kind} is registered at appliance {site} at host {host!r},
    path {path!r}: the other site cannot name a place to write, only {site}'s operators can.
    Register the location on {site} first (`tandem app add NAME --host {host} --path {path}
    --kind {kind}`), then fail back again."""

    http_status = 409


class VmTargetNotRegistered(TandemError):
    """No vm app is registered at appliance {site} for domain {domain!r} on host {host!r}:
    the other site cannot name a VM to write, only {site}'s operators can. Register the
    restored domain on {site} first (`tandem app add NAME --kind vm --host {host} --domain
    {domain}`), then fail back again."""

    http_status = 409


class CertificateMismatch(TandemError):
    """The certificate of {url} has fingerprint {actual}, not the pinned {expected}.
    If the peer was re-initialised on purpose, pair again with its new fingerprint."""

    http_status = 502


# --- hooks ------------------------------------------------------------------------------


class HookRefused(TandemError):
    """The host refuses to run hook script {script!r}: {reason}. A hook is an executable
    regular file in the agent's scripts folder {folder}, owned by root and writable by no one
    else; install it there (chown root, chmod 0755) or register another name with
    `tandem app set APP --start/--stop SCRIPT`."""

    http_status = 422


class HookTimedOut(TandemError):
    """The hook script {script!r} did not finish within {seconds:g} s on the host and was
    stopped. Make it return once its work is done (a start script must not wait for the
    app it starts; a stop script succeeds when the app is already stopped)."""

    http_status = 504


class HookFailed(TandemError):
    """The {hook} hook {script!r} of application {app!r} exited with status {status} on host
    {host}{why}. Fix the script on the host (its output is in the job's log) and run the
    operation again."""

    http_status = 502


# --- storage ----------------------------------------------------------------------------


class StorageError(TandemError):
    """Storage error: {detail}"""


class SourceUnreadable(StorageError):
    """Cannot read the source {path}: {reason}. Check that it exists and is readable."""

    http_status = 422


class SourceChanged(StorageError):
    """The source {path} changed while it was being captured ({reason}).
    Stop or quiesce the application, or capture again."""

    http_status = 409


class PointInTimeUnavailable(StorageError):
    """No point in time of {path} can be cut: {reason}. Put the data on a btrfs subvolume or
    a file system that reflinks (XFS, btrfs), or choose another cut with
    `tandem app set APP --consistency freeze|hooks|none`."""

    http_status = 409


class ClusterUnfit(TandemError):
    """The PostgreSQL cluster at {path} cannot be protected or started: {reason}. {fix}."""

    http_status = 409


class PostgresCommandFailed(TandemError):
    """PostgreSQL at {path}: {reason}. Check that the cluster runs and read its log."""

    http_status = 502


class RecoveryFailed(TandemError):
    """PostgreSQL at {path} could not be recovered: {reason}. Fix the cause (its log is
    quoted) and present the image again."""

    http_status = 500


class RecoveryPointUnavailable(TandemError):
    """Application {app!r} cannot be recovered to {target}: {reason}. Choose a time in its
    recoverable window ({window}; `tandem images {app}` shows it), or --latest."""

    http_status = 422
    exit_code = 1


class ChunkMissing(StorageError):
    """Chunk {digest} is not in the pool {pool}. Run `tandem storage verify` and re-capture
    or re-replicate the images that name it."""


class ChunkCorrupt(StorageError):
    """Chunk {digest} in pool {pool} is corrupt ({reason}); it will not be served.
    Run `tandem storage verify` and re-capture or re-replicate the images that name it."""


class ManifestInvalid(StorageError):
    """Manifest {digest} is invalid: {reason}. The image cannot be used; delete it."""


class UnsafePath(StorageError):
    """The manifest names the path {path!r}, which would escape the target ({reason}).
    Refusing to restore it; the image is damaged or forged."""

    http_status = 422


class PoolFull(StorageError):
    """The pool {pool} has no space left ({reason}). Free space or prune images;
    nothing half-written was kept."""

    http_status = 507


class TargetInvalid(StorageError):
    """Cannot restore onto {path}: {reason}."""

    http_status = 422


class CopyFrozen(StorageError):
    """{what} takes no writes now: a failback is checking that it is unchanged, is
    discarding it, or waits for its commit or undo. Write to the application where it runs
    (production, or here again once the failback is undone)."""

    http_status = 409


class ObjectStoreUnreachable(StorageError):
    """The object store at {endpoint} did not answer ({reason}) after {attempts} attempt(s).
    Check the endpoint of the pool (`s3://BUCKET?endpoint=URL`) and that the store runs."""

    http_status = 503


class ObjectStoreDenied(StorageError):
    """The object store at {endpoint} refused the credentials for bucket {bucket!r}
    ({reason}). Check the access key and secret given for the pool (TANDEM_S3_ACCESS_KEY,
    TANDEM_S3_SECRET_KEY) and the bucket's permissions."""

    http_status = 502


class BucketMissing(StorageError):
    """The bucket {bucket!r} does not exist at {endpoint}. Create it on the store, or give
    an existing bucket in the pool's URL (`s3://BUCKET?endpoint=URL`)."""

    http_status = 502


class ObjectStoreFailed(StorageError):
    """The object store at {endpoint} failed {operation} of {key!r} ({reason}) after
    {attempts} attempt(s); nothing half-written was made visible. Check the store's health
    and run the operation again."""

    http_status = 502


class ObjectMissing(StorageError):
    """Object {key!r} is not in bucket {bucket!r} at {endpoint}. Run `tandem storage verify`
    to find the images that name it."""


class PoolUrlInvalid(InvalidInput):
    """Invalid pool URL {url!r}: {reason}. Give a local directory or
    `s3://BUCKET[/PREFIX]?endpoint=http(s)://HOST:PORT[&region=REGION]`."""


# --- remote parts -----------------------------------------------------------------------


class Unreachable(TandemError):
    """{what} {name} unreachable at {url}: {reason}. Check that it runs and the address."""

    http_status = 502


class CatalogUnavailable(TandemError):
    """The catalog database {url} is not answering: {reason}. Check that the database server
    runs and accepts connections; the appliance reconnects by itself, so retry once it is
    back."""

    http_status = 503


class NotHypervisor(TandemError):
    """This host is not a hypervisor: {reason}. Install libvirt (libvirt-daemon-system,
    qemu-system-x86 and the agent's `vm` extra, libvirt-python) and start libvirtd, or use
    a host that `tandem vms --host H` lists domains of."""

    http_status = 422


class VmTargetMissing(TandemError):
    """Host {host} has no {what} {name!r}{why}. Name one the host has and that is active
    (`virsh pool-list --all` / `virsh net-list --all` on it; `virsh pool-start NAME` starts
    one)."""

    http_status = 422
    exit_code = 2


class VmDisksDiffer(TandemError):
    """Domain {domain} on host {host} has {have} disk(s) and the image of {app!r} holds
    {want}: its disks cannot be replaced one for one. Name a domain with {want} disk(s) with
    --vm, or define a new VM with --new-vm NAME."""

    http_status = 422
    exit_code = 2


class VmTargetInUse(TandemError):
    """Domain {domain} on host {host} already runs from image {image} (a test failover,
    failover or mount made it the target). Unmount or delete that image first (`tandem
    unmount {image}`): it gives the domain its own definition back."""

    http_status = 409


class RemoteError(TandemError):
    """{what} {name} answered with an error: {detail}"""

    http_status = 502


# --- lifecycle and jobs -----------------------------------------------------------------


class TransitionRefused(TandemError):
    """Cannot {operation} application {app!r} now: {reason}."""

    http_status = 409


class UnsyncedWrites(TandemError):
    """The DR copy of {app!r} changed after {image} ({changes}): production does not hold
    those writes, and {operation} would discard them. {fix}"""

    http_status = 409


class JobCanceled(TandemError):
    """Job {job} was canceled before it finished. Run the operation again if it is still
    needed."""

    http_status = 409


class StaleEpoch(TandemError):
    """Replication of {app!r} carries writer epoch {carried}, but this appliance holds epoch
    {current}: the application was failed over here and its DR copy is now the writer.
    Fail back before replicating again."""

    http_status = 409


# --- conditions operators meet (each its own class; subclasses keep the status and code
# of the catch-all they replace, so callers catching InvalidInput or Conflict still do) ----


class IntervalInvalid(InvalidInput):
    """Invalid input: {option} {text!r} is not an interval. Write it like 30s, 15m, 1h or
    1h30m (between 1s and 366d)."""


class TimeInvalid(InvalidInput):
    """Invalid input: --time {text!r} is not a time. Write it as "YYYY-MM-DD HH:MM:SS" (UTC)
    or with its offset, e.g. "2026-12-02 10:15:03+01:00"."""


class TimeAndLatest(InvalidInput):
    """Invalid input: give --time or --latest, not both. Keep the one you mean."""


class RecoveryOptionsUnused(InvalidInput):
    """Invalid input: {options} are for a recovered database; {app!r} is a {kind} app.
    Leave them out."""


class PortWithoutRecovery(InvalidInput):
    """Invalid input: --port is the port of a recovered database. Give --time or --latest
    with it, or leave it out."""


class VmOptionsUnused(InvalidInput):
    """Invalid input: --new-vm, --vm, --pool, --network, --power-on and --shutdown-timeout are
    for vm apps; {app!r} is a {kind} app. Leave them out."""


class SyncbackOfRunningDatabase(InvalidInput):
    """Invalid input: syncback {image} of {app!r} was taken while PostgreSQL ran at the DR
    site, {how}; it is not a cluster to write in place. Stop the database at the DR site, run
    `tandem syncback {app}` there (it sends only what changed since) and restore that one."""


class WalNotHome(Conflict):
    """Syncback {image} of {app!r} is a base backup of the database running at the DR site:
    it is consistent only with its WAL replayed up to LSN {lsn}, and WAL segment {segment} is
    not held here yet. Wait until the DR site has pushed its WAL home (`tandem images {app}`
    shows the window) and restore again, or stop the database at the DR site, run
    `tandem syncback {app}` there and restore that final syncback."""


class MountPointNeeded(InvalidInput):
    """Invalid input: {what} needs a folder to be placed in. Give --mount-point with a full
    path."""


class LabelTooLong(InvalidInput):
    """Invalid input: --label must be at most {limit} characters. Give a shorter label."""


class ImageNotOfApp(InvalidInput):
    """Invalid input: image {image} is not {what} of {app!r}. List its images with
    `tandem images {app}` and give one of them."""


class PairedWithItself(InvalidInput):
    """Invalid input: the appliance at {url} is named {name!r} like this one: two sites
    need two names. Pair with the other site's appliance, or re-initialise one of them
    with another --name."""


class ImagePresented(Conflict):
    """Image {image} is presented to host {host!r}. Unmount it first (`tandem unmount
    {image}`)."""


class ImageNotMounted(Conflict):
    """Image {image} ({kind}) is not mounted: there is nothing to unmount. List what is
    presented with `tandem images APP`."""


class ImageInService(Conflict):
    """Image {image} is where {app!r} runs since its failover. Fail back (`tandem failback
    {app}`) before unmounting it."""


class ImageBeingDeleted(Conflict):
    """Image {image} is being deleted. Choose another image (`tandem images {app}`)."""


class PathsOverlap(Conflict):
    """{what} {path} on host {host} {how} application {other!r} ({other_path}); apps on one
    host must not overlap, or restoring one would overwrite the other's files. Choose a
    path outside it."""


class LastAdminToken(Conflict):
    """Token {name!r} is the last admin token. Add another admin token (`tandem token add
    NAME --role admin`) before removing it."""


class AlreadyPaired(Conflict):
    """This appliance is already paired with {peer!r}. Remove it first with `tandem peer
    remove {peer}`."""


class GcRunning(Conflict):
    """Garbage collection job {job} is already {status}. Follow it with `tandem job show
    {job}`."""


class GcElsewhere(Conflict):
    """Another appliance process of this catalog is collecting the pool's garbage. Wait for
    its gc job to end (`tandem jobs --type gc`)."""


class SyncbackNotRestored(Conflict):
    """Production ({peer}) has not restored the newest syncback {syncback} of {app!r} (its
    last restore: {restored}). Restore it there first (`tandem restore {app} --image
    {syncback} --confirm ...` on {peer}), or fail back with --force to drop what only the
    DR copy holds."""


class ImageOfOtherApp(InvalidInput):
    """Invalid input: image {image} belongs to application {owner!r}, not {app!r}. List
    {app}'s images with `tandem images {app}` and give one of them."""


class JobParamsInvalid(TandemError):
    """Job {job} ({type}) cannot run: its stored parameters are not valid for it ({problems});
    nothing was changed. Start the operation again (`tandem job show {job}` shows what it
    was)."""

    http_status = 500
