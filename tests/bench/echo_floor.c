/* echo_floor: the floor of a one-connection proxymap lookup on this machine.
 * usage: echo_floor SOCKET
 * An epoll server on a UNIX socket that speaks just enough of the proxymap protocol
 * for pmload: the announcement on accept, then one fixed "found" reply per complete
 * request (an attribute list ending in an empty name), without looking at the
 * request. What it costs per request is the kernel's and the wake-ups' share of any
 * server; a real proxymap can only add to it. */
#define _GNU_SOURCE
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/epoll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NAMEVAL(n, v) n "\0" v "\0"
static const char announce[] = NAMEVAL("protocol", "proxymap_protocol") "";
static const char reply[] = NAMEVAL("status", "0") NAMEVAL("value", "floor") "";

typedef struct { int fd; int len; char buf[8192]; } client_t;

/* Length of the first complete attribute list in b[0..n), or 0. */
static int list_end(const char *b, int n) {
  int i = 0;
  for (;;) {
    if (i >= n) return 0;
    if (b[i] == 0) return i + 1;
    while (i < n && b[i]) i++;
    if (++i >= n) return 0;
    while (i < n && b[i]) i++;
    if (++i > n) return 0;
  }
}

static void serve(client_t *c) {
  int r = read(c->fd, c->buf + c->len, sizeof c->buf - c->len);
  if (r <= 0) { close(c->fd); free(c); return; }
  c->len += r;
  int used = 0, n;
  while ((n = list_end(c->buf + used, c->len - used)) > 0) {
    used += n;
    if (write(c->fd, reply, sizeof reply) != (ssize_t) sizeof reply) { perror("write"); exit(1); }
  }
  memmove(c->buf, c->buf + used, c->len - used);
  c->len -= used;
}

int main(int argc, char **argv) {
  if (argc != 2) { fprintf(stderr, "usage: echo_floor SOCKET\n"); return 2; }
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
  int ls = socket(AF_UNIX, SOCK_STREAM, 0);
  unlink(argv[1]);
  if (bind(ls, (void *) &a, sizeof a) < 0 || listen(ls, 128) < 0) { perror("listen"); return 1; }
  int ep = epoll_create1(0);
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
  epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
  struct epoll_event evs[64];
  for (;;) {
    int n = epoll_wait(ep, evs, 64, -1);
    for (int i = 0; i < n; i++) {
      client_t *c = evs[i].data.ptr;
      if (c) { serve(c); continue; }
      int fd = accept(ls, NULL, NULL);
      if (fd < 0) continue;
      c = calloc(1, sizeof *c);
      c->fd = fd;
      if (write(fd, announce, sizeof announce) != (ssize_t) sizeof announce) { close(fd); free(c); continue; }
      struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
      epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
    }
  }
}
