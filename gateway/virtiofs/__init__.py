"""The virtio-fs front-end: a vhost-user-fs backend (the device side of QEMU's vhost-user-fs-pci).

Three sans-IO layers, each driven by tests with bytes, none of which decides or performs anything:

* ``vhost_user`` (with ``vhost_user_abi``): the control channel (QEMU's Unix socket): messages in,
  replies and events out;
* ``memory`` and ``virtqueue``: the guest's shared memory and the split virtqueues laid out in it;
* ``fuse_abi``, ``fuse_requests``, ``fuse_decode``, ``fuse_encode``: the FUSE messages that travel in
  the queues, as Linux 6.1's virtiofs client speaks them (protocol 7.36).

Above them, the back-end (``gateway virtiofsd``):

* ``inodes``: the bounded inode table (O_PATH fds with their canonical paths) and open handles;
* ``readonly_fs``: FUSE requests performed through the shared resolver (gateway.core.resolve);
* ``export_fs``: the writable one: each change performed by the 9p executor (gateway.core.executor) on
  the resolution it was decided on, as the guest's uid/gid;
* ``device``: vhost-user events applied, queues served; ``daemon``: the socket and the poll loop;
* ``cli``: virtiofsd's options.

* ``policy``: one policy for both front-ends: each FUSE request as the 9p request the rules decide, the
  decision before anything is touched, the record in the trail before the reply.
"""
