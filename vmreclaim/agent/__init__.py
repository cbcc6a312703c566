"""The guest agent (``vmreclaim agent``): capture deletions, verify, spool, send, fence.

It runs as root inside a Linux guest (or on a host against a loop-mounted image) and
uses only the standard library plus vmreclaim's base dependencies; it never imports
:mod:`vmreclaim.host`. See docs/protocol.md for what it says to the host.
"""
