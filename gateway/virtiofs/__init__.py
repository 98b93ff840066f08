"""The virtio-fs front-end: a vhost-user-fs backend (the device side of QEMU's vhost-user-fs-pci).

Three sans-IO layers, each driven by tests with bytes, none of which decides or performs anything:

* ``vhost_user``: the control channel (QEMU's Unix socket): messages in, replies and events out;
* ``memory`` and ``virtqueue``: the guest's shared memory and the split virtqueues laid out in it;
* ``fuse_abi``, ``fuse_decode``, ``fuse_encode``: the FUSE messages that travel in the queues, as
  Linux 6.1's virtiofs client speaks them (protocol 7.36).

The file-system side (an inode table of O_PATH fds, the rules, the executor, the trail) sits above
these, as it does for the 9p front-end: every decoded FUSE request is a typed value that can be mapped
onto a rules request before anything is touched.
"""
