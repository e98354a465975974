"""The client side: the socket client, batch runs, the live view."""
