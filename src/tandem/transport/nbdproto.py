"""NBD protocol constants and wire structs, shared by the appliance's server
(``appliance.nbd``) and the client that reads libvirt's backup exports (``transport.nbd``).

From https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md.
"""

from __future__ import annotations

import struct

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0  # client flags
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 2**31 + 1
REP_ERR_POLICY = 2**31 + 2
REP_ERR_INVALID = 2**31 + 3
REP_ERR_TLS_REQD = 2**31 + 5
REP_ERR_UNKNOWN = 2**31 + 6

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

FLAG_HAS_FLAGS = 1 << 0  # transmission flags
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_CAN_MULTI_CONN = 1 << 8

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_REQ_ONE = 1 << 3  # block status: one extent is enough
COMMAND_NAMES = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_DISC: "disconnect",
    CMD_FLUSH: "flush",
    CMD_TRIM: "trim",
    CMD_WRITE_ZEROES: "write-zeroes",
    CMD_BLOCK_STATUS: "block-status",
}

STRUCTURED_REPLY_MAGIC = 0x668E33EF
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 2**15 + 1
BASE_ALLOCATION = "base:allocation"  # the metadata context the appliance serves
ALLOCATION_ID = 1  # its context id on every connection
STATE_HOLE = 1 << 0  # base:allocation flags
STATE_ZERO = 1 << 1
MAX_EXTENTS = 1024  # descriptors in one block-status reply (the protocol allows fewer)

# NBD error values (fixed by the protocol; they equal Linux's errno numbers)
EPERM = 1
EIO = 5
EINVAL = 22
ENOSPC = 28
ESHUTDOWN = 108


HELLO = struct.Struct(">QQH")
OPTION = struct.Struct(">QII")
OPT_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
REPLY = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")  # structured reply chunk header
DATA_CHUNK = struct.Struct(">IHHQIQ")  # … of an OFFSET_DATA chunk, with its offset

REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_ERROR_OFFSET = 2**15 + 2
REP_FLAG_ERROR = 2**31
