"""The executor core shared by every front-end: resolve once, perform on the resolved fds, fs ids."""
