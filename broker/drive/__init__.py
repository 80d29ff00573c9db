"""The driver: one thread, one epoll over the ROUTER and every upstream socket. It reads events,
asks the decisions what to do, and carries out what they return."""
