/* An RFC 9146 (DTLS 1.2 Connection ID) PSK client for nbhub's tests, on wolfSSL, which
 * scripts/build-cid-client builds with CID from its crates.io source. nbhub's own test client
 * runs on OpenSSL, which has no CID, so this one is independent of the server by construction.
 *
 *   nbhub-cid-client HOST PORT IDENTITY PSK_HEX SUITE CID
 *
 * CID is the hex CID the server is to put on records to us, "-" for an empty one (we send with
 * the server's CID but receive without), or "none" to offer no CID at all. After the handshake it
 * prints "ok cid=<0|1> port=<local port>", then reads commands from stdin, one per line:
 *   send HEX    one record of application data          -> "sent"
 *   recv MS     the next record's data within MS ms     -> "data HEX" | "timeout"
 *   rebind      a new socket, so a new source port      -> "port N"
 *   replay      the last datagram sent, sent again raw  -> "replayed"
 *   quit
 */
#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char *identity;
static unsigned char psk[64];
static unsigned int psk_len;
static struct sockaddr_storage server;
static socklen_t server_len;
static unsigned char last[2048];
static int last_len;

static unsigned int psk_cb(WOLFSSL *ssl, const char *hint, char *id, unsigned int id_max, unsigned char *key,
                           unsigned int key_max) {
    (void)ssl;
    (void)hint;
    if (strlen(identity) + 1 > id_max || psk_len > key_max) return 0;
    strcpy(id, identity);
    memcpy(key, psk, psk_len);
    return psk_len;
}

/* Sends as wolfSSL would, keeping a copy of each datagram for "replay". */
static int send_cb(WOLFSSL *ssl, char *buf, int sz, void *ctx) {
    (void)ctx;
    int fd = wolfSSL_get_fd(ssl);
    if (sz <= (int)sizeof last) {
        memcpy(last, buf, sz);
        last_len = sz;
    }
    ssize_t n = send(fd, buf, sz, 0);
    if (n < 0) return errno == EAGAIN ? WOLFSSL_CBIO_ERR_WANT_WRITE : WOLFSSL_CBIO_ERR_GENERAL;
    return (int)n;
}

static int hex_decode(const char *hex, unsigned char *out, size_t max) {
    size_t n = strlen(hex);
    if (n % 2 || n / 2 > max) return -1;
    for (size_t i = 0; i < n / 2; i++) {
        unsigned int b;
        if (sscanf(hex + 2 * i, "%2x", &b) != 1) return -1;
        out[i] = (unsigned char)b;
    }
    return (int)(n / 2);
}

static int new_socket(void) {
    int fd = socket(server.ss_family, SOCK_DGRAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&server, server_len) != 0) {
        perror("socket");
        exit(2);
    }
    return fd;
}

static int local_port(int fd) {
    struct sockaddr_storage a;
    socklen_t len = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &len);
    return ntohs(a.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&a)->sin6_port
                                         : ((struct sockaddr_in *)&a)->sin_port);
}

static long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s HOST PORT IDENTITY PSK_HEX SUITE CID|-|none\n", argv[0]);
        return 2;
    }
    identity = argv[3];
    int k = hex_decode(argv[4], psk, sizeof psk);
    if (k <= 0) {
        fprintf(stderr, "PSK_HEX is not hex\n");
        return 2;
    }
    psk_len = (unsigned int)k;
    struct addrinfo hints = {.ai_socktype = SOCK_DGRAM}, *ai;
    if (getaddrinfo(argv[1], argv[2], &hints, &ai) != 0) {
        fprintf(stderr, "cannot resolve %s\n", argv[1]);
        return 2;
    }
    memcpy(&server, ai->ai_addr, ai->ai_addrlen);
    server_len = ai->ai_addrlen;
    freeaddrinfo(ai);

    wolfSSL_Init();
    WOLFSSL_CTX *ctx = wolfSSL_CTX_new(wolfDTLSv1_2_client_method());
    wolfSSL_CTX_set_psk_client_callback(ctx, psk_cb);
    wolfSSL_CTX_SetIOSend(ctx, send_cb);
    if (wolfSSL_CTX_set_cipher_list(ctx, argv[5]) != WOLFSSL_SUCCESS) {
        fprintf(stderr, "unknown suite %s\n", argv[5]);
        return 2;
    }
    WOLFSSL *ssl = wolfSSL_new(ctx);
    if (strcmp(argv[6], "none") != 0) {
        unsigned char cid[32];
        int cid_len = strcmp(argv[6], "-") == 0 ? 0 : hex_decode(argv[6], cid, sizeof cid);
        if (cid_len < 0 || wolfSSL_dtls_cid_use(ssl) != WOLFSSL_SUCCESS ||
            wolfSSL_dtls_cid_set(ssl, cid_len ? cid : NULL, (unsigned int)cid_len) != WOLFSSL_SUCCESS) {
            fprintf(stderr, "cannot offer CID %s\n", argv[6]);
            return 2;
        }
    }
    int fd = new_socket();
    wolfSSL_dtls_set_peer(ssl, &server, server_len);
    wolfSSL_set_fd(ssl, fd);
    if (wolfSSL_connect(ssl) != WOLFSSL_SUCCESS) {
        printf("error handshake %d\n", wolfSSL_get_error(ssl, 0));
        return 1;
    }
    printf("ok cid=%d port=%d\n", wolfSSL_dtls_cid_is_enabled(ssl), local_port(fd));
    fflush(stdout);
    wolfSSL_dtls_set_using_nonblock(ssl, 1);
    fcntl(fd, F_SETFL, O_NONBLOCK);

    char line[8192];
    unsigned char buf[4096];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\r\n")] = 0;
        if (strncmp(line, "send ", 5) == 0) {
            int n = hex_decode(line + 5, buf, sizeof buf);
            if (n < 0 || wolfSSL_write(ssl, buf, n) != n)
                printf("error send %d\n", wolfSSL_get_error(ssl, 0));
            else
                printf("sent\n");
        } else if (strncmp(line, "recv ", 5) == 0) {
            long long until = now_ms() + atol(line + 5);
            int n = -1;
            for (;;) {
                n = wolfSSL_read(ssl, buf, sizeof buf);
                if (n > 0) break;
                int e = wolfSSL_get_error(ssl, n);
                long long left = until - now_ms();
                if ((e != WOLFSSL_ERROR_WANT_READ && e != WOLFSSL_ERROR_WANT_WRITE) || left <= 0) break;
                struct pollfd p = {.fd = fd, .events = POLLIN};
                poll(&p, 1, (int)left);
            }
            if (n > 0) {
                printf("data ");
                for (int i = 0; i < n; i++) printf("%02x", buf[i]);
                printf("\n");
            } else {
                printf("timeout\n");
            }
        } else if (strcmp(line, "rebind") == 0) {
            int next = new_socket();
            fcntl(next, F_SETFL, O_NONBLOCK);
            wolfSSL_set_fd(ssl, next); /* keeps the session: keys, epoch, sequence numbers */
            wolfSSL_dtls_set_peer(ssl, &server, server_len);
            close(fd);
            fd = next;
            printf("port %d\n", local_port(fd));
        } else if (strcmp(line, "replay") == 0) {
            send(fd, last, last_len, 0);
            printf("replayed\n");
        } else if (strcmp(line, "quit") == 0) {
            break;
        } else {
            printf("error unknown command\n");
        }
        fflush(stdout);
    }
    wolfSSL_free(ssl);
    wolfSSL_CTX_free(ctx);
    close(fd);
    return 0;
}
