"""Server names for flows: passive DNS, TLS SNI and QUIC Initial SNI.

An export is easier to act on, and to approve, by the service it went to than
by its address.  These modules read names off the wire without decrypting
anything the endpoints did not send in the clear: DNS answers (``dns``), the
server name of a TLS ClientHello (``tls``), and the ClientHello inside a QUIC
v1 Initial packet, whose keys are derived from public values (``quic``).
"""
