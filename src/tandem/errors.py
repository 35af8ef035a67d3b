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


class RecoveryOver(Conflict):
    """The recovery {run} of the copy at {path} is over: its spool takes no more WAL.
    Nothing to do: replay ended without this segment, so it was not needed."""


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


class WriterLapsed(StorageError):
    """A writer to the pool on {pool} was silent for {seconds} s, longer than its
    registration lasts: a garbage collection may have removed chunks it relied on, so it
    stops here and nothing it wrote is committed. Run the capture or replication again."""

    http_status = 409


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


class SyncbackOfferMisplaced(InvalidInput):
    """Invalid input: syncback session {session} was opened {opened} its image and is
    committed {committed} one. A syncback's image is offered once: when its session is
    opened, or with its commit when it was opened without one."""


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


# --- input the operator types (InvalidInput: 422, exit code 2) ---------------------------


class NameInvalid(InvalidInput):
    """Invalid input: {what} {name!r} is not a valid name. Use {rule}."""


class ChoiceInvalid(InvalidInput):
    """Invalid input: {what} {value!r} is not one tandem knows. Use one of {choices}."""


class OutOfRange(InvalidInput):
    """Invalid input: {what} {value!r} is out of range. Give {allowed}."""


class OptionsDoNotApply(InvalidInput):
    """Invalid input: this request takes no {options}: {why}. {fix}."""


class OptionsMissing(InvalidInput):
    """Invalid input: {what} needs {options}{why}. Give {options}."""


class AppLocationInvalid(InvalidInput):
    """Invalid input: a {kind} app is located by {needs} alone ({unused} is for {other}
    apps). Give {needs}{hint}."""


class MountPathInvalid(InvalidInput):
    """Invalid input: the {what} {path!r} {problem}. Give a full path below / without '..',
    such as /mnt/app."""


class ListenInvalid(InvalidInput):
    """Invalid input: {option} takes HOST:PORT, not {value!r}. Write it like
    127.0.0.1:8443 or 0.0.0.0:10809."""


class UrlInvalid(InvalidInput):
    """Invalid input: {url!r} is not a daemon URL ({reason}). Write it like
    https://HOST:PORT."""


class ConnectionOptionMissing(InvalidInput):
    """Invalid input: no {what} given. Pass {option} or set {env}."""


class ConfigValueInvalid(InvalidInput):
    """Invalid input: {file} has {key} {value!r}. Give {allowed} there, or remove the key
    for the default."""


class CatalogUrlInvalid(InvalidInput):
    """Invalid input: catalog URL {url!r} {problem}. Give a database file
    (sqlite:////var/lib/tandem/catalog.db) or a PostgreSQL database
    (postgresql://USER@HOST/DB)."""


class CatalogTaken(InvalidInput):
    """Invalid input: the catalog {url} already belongs to an appliance. Give an empty
    database to --catalog."""


class CatalogNotShared(InvalidInput):
    """Invalid input: {directory} {how}, but its catalog is SQLite, which one process alone
    may use. Give the first appliance process a PostgreSQL catalog (`tandem appliance init
    DIR --catalog postgresql://USER@HOST/DB`) and join that one."""


class JoinInvalid(InvalidInput):
    """Invalid input: --join {first}: {reason}. {fix}."""


class DaemonDirInvalid(InvalidInput):
    """Invalid input: {directory} {problem}. {fix}."""


class NbdListenUnreachable(InvalidInput):
    """Invalid input: --nbd-listen {nbd_listen} and --listen {listen} name no address hosts
    can reach in export URIs. Give --nbd-listen the appliance's address."""


class NbdNeedsTls(InvalidInput):
    """Invalid input: NBD on {host}, which is not a loopback address, {what}. {fix}."""


class CursorStale(InvalidInput):
    """Invalid input: the cursor {after!r} names no {what} (any more). List again without
    `after`."""


class TestOnProductionHost(InvalidInput):
    """Invalid input: host {host!r} is where {app!r} runs in production; a test copy never
    shares its host. Present the copy on another host."""


class TargetIsOriginal(InvalidInput):
    """Invalid input: {where} is {app!r} itself ({how}). Fail back with --target original to
    write it, or name another target."""


class PgBaseNeedsRecovery(InvalidInput):
    """Invalid input: image {image} is a PostgreSQL base image, which starts only with its
    WAL replayed; restored as it is it would start as a torn cluster. Recover it instead with
    `tandem mount {image} --host HOST --mount-point DIR --latest` (or --time)."""


class ImageHoldsNoVm(InvalidInput):
    """Invalid input: image {image} holds no VM (no disk layout in its meta). Give an image
    of a vm app (`tandem images APP`)."""


class ImageKindDiffers(InvalidInput):
    """Invalid input: image {image} is {have}, which cannot {how}. {fix}."""


class NoVmDefinition(InvalidInput):
    """Invalid input: no image captured at this site holds the definition of VM {domain}: a
    new domain is defined only from production's own capture. Fail back with --target
    original or restored."""


class VmDiskMissing(InvalidInput):
    """Invalid input: {where} has no {what} {disk}, which the image holds (it has {has});
    nothing was touched. Name a domain that has the image's disks (same targets and sizes;
    `tandem vms --host HOST` lists them)."""


class VmDiskSizeDiffers(InvalidInput):
    """Invalid input: disk {disk} of {where} is {have} bytes and the image's is {want};
    nothing was touched. Resize the disk to the image's size (`qemu-img resize`) and
    restore again."""


class VmIsItsSource(InvalidInput):
    """Invalid input: {what} cannot be {domain}: a VM is never failed over onto the domain it
    came from. {fix}."""


# --- presenting an image (operations.present) and a presented copy's WAL (agent.pg) ---------


class VmTargetNeeded(InvalidInput):
    """Invalid input: {app!r} is a VM, and this request names no VM to run it as. Give --new-vm
    NAME to define a new VM at the host (--network N gives it one, --power-on starts it),
    --vm DOMAIN to run it as an existing domain of the host, or --mount-point PATH to mount
    its disks' file systems."""


class OptionsExclusive(InvalidInput):
    """Invalid input: {choices} name the same thing two ways. Give one of them, not both."""


class ShutdownTimeoutOutOfRange(InvalidInput):
    """Invalid input: --shutdown-timeout is {value} seconds. Give a number of seconds from 0
    to 3600."""


class ProductionHostListed(InvalidInput):
    """Invalid input: host {host!r} is where {app!r} runs in production, and a failed-over VM
    is never defined there. Leave it out of --hosts."""


class PresentActionUnknown(InvalidInput):
    """Invalid input: there is no --action {action!r}. Give one of {actions}."""


class VmPresentationUnknown(InvalidInput):
    """Invalid input: a VM image is not presented with --action {action}; it is presented as
    its disks' NBD export (map-only), as a VM on that export (--new-vm NAME, --vm DOMAIN), as
    a new VM whose disks are copied into its pool (--action copy --pool P), or with its
    disks' file systems mounted (--action specify --mount-point PATH: PATH_1, PATH_2… for
    several disks). Give one of those."""


class MapOnlyOfTree(InvalidInput):
    """Invalid input: map-only presents a volume without mounting a file system, and
    {app!r} is a file tree. Give --mount-point PATH, or leave --action out (keep-source-path)."""


class NbdNotServed(InvalidInput):
    """Invalid input: this appliance serves no NBD exports, so it cannot present volume image
    {image}. Start it with its NBD server (`tandem appliance serve DIR`)."""


class NbdCertificateMissing(InvalidInput):
    """Invalid input: this appliance serves NBD over TLS but has no certificate to send
    hypervisor host {host}. Start it from its directory (`tandem appliance serve DIR`)."""


class WalFileGone(InvalidInput):
    """Invalid input: WAL file {name} of {app} is not in this host's spool (acknowledged and
    removed already, or never written). Let the appliance read the files the spool lists
    (it asks for them again at its next WAL read)."""


class NotAPresentedCopy(InvalidInput):
    """Invalid input: {path} is not the folder of a copy presented on this host (a folder
    named by its real path, no symbolic link). Give the mount point the presenting job
    reported."""


class VmPoolUnfit(InvalidInput):
    """Invalid input: storage pool {pool!r} {problem}. {fix}."""


class LibvirtRefused(InvalidInput):
    """Invalid input: libvirt refused {what} ({reason}){state}. Correct the domain or its
    disks as the reason says (`virsh` on the host), then run the operation again."""


class NbdCertificateInvalid(InvalidInput):
    """Invalid input: the appliance's certificate sent for its NBD export over TLS {problem}.
    Present the image again (a re-initialised appliance sends its new certificate)."""


class NbdTlsFolderMissing(InvalidInput):
    """Invalid input: this agent has no folder for the NBD TLS certificate. Set {env} to the
    folder qemu.conf names as nbd_tls_x509_cert_dir and restart the agent."""


class DiskHasNoFileSystem(InvalidInput):
    """Invalid input: disk {disk} of image {image} has no file system this host can mount
    ({what}). Present the image without --mount-point (its NBD export) or as a VM (--new-vm
    NAME)."""


class DiskMountUnavailable(InvalidInput):
    """Invalid input: this host cannot mount a VM's disks: {reason}. Install what it names
    on the host, or present the image without --mount-point or as a VM (--new-vm NAME)."""


class MountPointOverlaps(InvalidInput):
    """Invalid input: the mount point {path} overlaps {other}. Choose another mount point."""


class TooManyPerRequest(InvalidInput):
    """Invalid input: {count} {what} in one request. Ask for at most {limit} per request and
    split the rest into further requests."""


# --- state that refuses the operation (Conflict: 409) -------------------------------------


class AppBusy(Conflict):
    """Application {app!r} has the {type} job {job} {status}; one lifecycle operation runs
    per application at a time. Wait for it to end (`tandem job show {job}`) or cancel it
    (`tandem job cancel {job}`)."""


class JobEnded(Conflict):
    """Job {job} already ended ({status}); it cannot {action}. Start the operation again for a
    new job if it is still needed."""


class HostInUse(Conflict):
    """Host {host!r} {holds} {names}. {fix}."""


class TemplateInUse(Conflict):
    """Template {template!r} protects the applications {apps}. Protect them with another
    template (`tandem app protect APP --template T`) or unprotect them first."""


class AppStillProtected(Conflict):
    """Application {app!r} is {state}. Unprotect it (`tandem app unprotect {app}`) before
    removing it."""


class AppHasImages(Conflict):
    """Application {app!r} still has {count} image(s). Delete them first (`tandem images
    {app}` lists them)."""


class TestFailoverBusy(Conflict):
    """The {holder} already {has} the test-failover image {image} ({of}); {rule}. Unmount
    it, then delete it: `tandem unmount {image}`, then `tandem image delete
    {image}`{alternative}."""


class FailoverImageLive(Conflict):
    """Image {image} is the failed-over copy that application {app!r} runs on; deleting it
    would lose the data written at the DR site. Fail back first (`tandem failback {app}`)."""


class ProtectiveSnapshotHeld(Conflict):
    """Image {image} is the protective snapshot of the pending failback of application
    {app!r}: it is the way back. Commit or undo the failback first (`tandem commit-failback
    {app}` or `tandem undo-failback {app}`)."""


class SameVmTarget(InvalidInput):
    """Invalid input: application {app!r} is the VM {host!r}; it cannot be failed over onto
    the VM it came from. Choose another host or a new VM."""


class DataInUse(Conflict):
    """The application's data at {path} is in use ({users}). Stop the application first, or
    give it a stop hook that the restore runs first (`tandem app set APP --stop SCRIPT`)."""


class CopyInUse(Conflict):
    """The {what} at {path} is in use ({users}). Close its files and stop the application
    using it (leave the folder too), then unmount again."""


class UnmountFailed(Conflict):
    """The {what} at {path} did not unmount ({reason}). Stop what uses it, then unmount
    again."""


class AlreadyMaterialized(Conflict):
    """Image {image} is already materialized on this host at {where}. Unmount it first
    (`tandem unmount {image}`)."""


class BeingMaterialized(Conflict):
    """Image {image} is being materialized on this host right now. Wait for its job to end
    (or cancel it), then unmount."""


class VirtualCopyNotOpen(Conflict):
    """The virtual copy of failover image {image} is not open in this appliance process.
    Run the operation again once the appliance has reopened it (a restarted appliance
    reopens the copies of failed-over images), on the process that serves it."""


class FailbackInterrupted(Conflict):
    """A failback of {app!r} began withdrawing its DR copy {image} and was interrupted. Run
    `tandem {again} {app}` again to finish it."""


class TargetKindDiffers(Conflict):
    """The app registered at {where} here, {other!r}, is a {other_kind}; {app!r} is a {kind}.
    Register the location with --kind {kind}, or choose another."""


class TargetNotEmpty(Conflict):
    """{path} on host {host} is not missing or empty ({held}): a failback with --target new
    writes the whole image there and would destroy what it holds. Register an empty
    location, or fail back with --target restored onto the app registered there."""


class MirrorOfOther(Conflict):
    """Application {app!r} here is not a mirror of {peer!r} (its origin is {origin}). Rename
    one of them (the names of mirrored apps are shared by both sites)."""


class MirrorKindDiffers(Conflict):
    """{peer!r} sends a {sent} image of {app!r}, which is a {kind} here. Rename one of them
    (the names of mirrored apps are shared by both sites)."""


class ReplicaOutOfOrder(Conflict):
    """Image {image} of {app!r} is older than the newest replica {newest}: a replayed or
    out-of-order replication is refused. Nothing to do: the next replication sends newer
    images."""


class SenderNotWriter(Conflict):
    """The {what} of {app!r} carries writer epoch {carried}, but the application is at epoch
    {current} here since a failover: the sender is no longer the writer. Nothing was
    applied; act on the site where the application runs now (`tandem apps` there shows it)."""


class WalRefused(Conflict):
    """WAL {segment} of {app!r} from {peer!r} is refused: {reason}. Nothing to do here; the
    peer stops sending it once the failover or replication it belongs to has ended."""


class CannotListen(Conflict):
    """Cannot listen on {address}: {reason}. Stop what uses the address, or change {option}
    in the daemon's config.json."""


class AlreadyRunning(Conflict):
    """Another {kind} already runs from {directory} (pid {pid}). Stop it first, or give
    another directory."""


# --- the host and the agent (500, as the catch-alls they replace) -----------------------


class FuseUnavailable(TandemError):
    """This host cannot present file-tree images through FUSE: {reason}. Either {fix}, or
    present with the copy action (`--action copy`)."""


class MountRegistryDamaged(TandemError):
    """The mount registry {path} {problem}. Restore it from a backup, or move it aside and
    remove what it listed by hand."""


class AgentWithoutDirectory(TandemError):
    """This agent app was made without its directory, where {what}. Pass the directory to
    create_app (`tandem agent serve` does)."""


class NbdExportUnreachable(StorageError):
    """This host {how} the appliance's NBD export ({reason}). Check that it reaches the
    appliance's NBD port, then present the image again."""


class LoopDeviceUnavailable(StorageError):
    """No loop device for the VM's disk ({reason}). Free one (`losetup -D` detaches unused
    ones) and present the image again."""


class DiskMountFailed(StorageError):
    """Disk {disk} of image {image} ({fstype}) did not mount at {path}: {reason}. Check the
    file system with fsck on a copy, or present the image as a VM (--new-vm NAME)."""


class VmDefinitionNotRestored(StorageError):
    """libvirt refused domain {domain}'s own definition back ({reason}). It is kept in the
    domain's metadata ({namespace}): define it by hand with `virsh define`."""


class WalSegmentDamaged(StorageError):
    """WAL segment {segment} at {path} {problem}; it is not served. Run the capture again to
    start a new base image."""


class NotAPool(StorageError):
    """{path} is not a chunk pool this version reads ({problem}). Give the pool's own
    location, or create one (`tandem storage init DIR`, or `tandem appliance init DIR --pool
    s3://BUCKET?endpoint=URL` on an object store)."""


class LiveManifestUnreadable(StorageError):
    """Cannot read manifest {manifest} of a live image ({reason}); garbage collection
    stopped so that no chunk of it is lost. Run `tandem image verify` on the app's images."""


class RateInvalid(InvalidInput):
    """Invalid input: --bandwidth {text!r} is not a rate. Write it like 50M or 800K (bytes per
    second; K, M and G are powers of 1024), or 0 for no cap."""


class DomainNameInvalid(InvalidInput):
    """Invalid input: {what} {name!r} is not a libvirt domain name tandem accepts. Use
    letters, digits and . _ + - (at most 64, starting with a letter or digit)."""


class MountPointTaken(Conflict):
    """The mount point {path} overlaps {used}, where image {image} is materialized. Unmount
    {image} first (`tandem unmount {image}`) or choose another mount point."""


class NotPresentedHere(InvalidInput):
    """Invalid input: {path} is not a copy presented on this host. Present the base image
    there first (test-failover, failover or mount with --mount-point)."""


class DomainGone(InvalidInput):
    """Invalid input: domain {domain} is gone, and so is its disk {disk}: nothing was
    restored. Define the domain and its disks again (`virsh define`), then restore."""


class VmIdentityTaken(InvalidInput):
    """Invalid input: domain UUID {uuid} exists on this host (the domain the image came
    from), and a VM that keeps its identity cannot run beside it. Fail over to another host,
    or make a test VM."""


class VmDiskNotFile(InvalidInput):
    """Invalid input: disk {disk} of domain {domain} is a {type} disk; a restore writes file
    disks (qcow2 or raw) in place. Make it a file disk in the domain's definition (`virsh
    edit {domain}`), then restore again."""


class PoolGcRunning(Conflict):
    """A garbage collection of pool {pool} is already running. Wait for it to end (`tandem
    jobs --type gc` shows it)."""


class OverlayDamaged(StorageError):
    """The virtual copy at {directory} cannot be opened: {problem}. Restore the folder from a
    backup of the appliance's data; or, if the writes made to the copy may be lost, unmount
    the image (`tandem unmount IMAGE`) and present it again."""


class LabDaemonFailed(TandemError):
    """The drill's {kind} {name} {what}: {said}. Fix what it says (a port or directory
    taken, a missing tool), then run the drill again."""


class StoreCredentialsMissing(InvalidInput):
    """Invalid input: a pool on an object store needs its credentials. Set {access} and
    {secret} in the environment of `tandem appliance init`."""


class StoreCredentialsUnreadable(InvalidInput):
    """Invalid input: {path} {problem}; it keeps the credentials of the pool on {url}. Write
    it again: a JSON object with "access_key" and "secret_key" (mode 0600)."""


class NotBuiltForStore(StorageError):
    """{what} is not built yet for a pool on an object store; nothing was removed. Keep GC
    off (or use a local pool) until it is."""
