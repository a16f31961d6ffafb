/*
 * dbdirect -- the database's own latency, with no proxy: what N Postfix processes
 * with a direct mysql: or pgsql: table would see.
 *
 * usage: dbdirect mysql|pgsql HOST PORT USER PASSWORD DBNAME QUERY KEYFILE CONNS SECONDS
 *
 * CONNS threads, each with its own connection (as each Postfix process has its own),
 * send QUERY with its first %s replaced by a key drawn at random from KEYFILE (one per
 * line; the bench keys need no escaping), read the whole result, and start the next
 * one: a closed loop, as pmload runs against a proxymap. Prints one line in pmload's
 * format: conns= requests= ok= nokey= other= rps= p50_us= p99_us= max_us=.
 *
 * Build: gcc -O2 dbdirect.c $(mariadb_config --cflags --libs) -I$(pg_config
 * --includedir) -lpq -lpthread (tests/bench/run.py does it once per source version).
 */
#include <errno.h>
#include <libpq-fe.h>
#include <mysql.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { MAX_KEYS = 100000, MAX_QUERY = 4096, MAX_SAMPLES = 1 << 22 };

struct settings {
    int mysql;
    const char *host, *user, *password, *dbname, *query;
    int port;
    double seconds;
};

struct worker {
    pthread_t thread;
    unsigned seed;
    long ok, nokey, other;
    size_t count;
    double *latencies; /* microseconds, MAX_SAMPLES / conns of them */
    size_t capacity;
    const char *error;
};

static struct settings settings;
static char *keys[MAX_KEYS];
static int key_count;
static struct timespec deadline;

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int past_deadline(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec > deadline.tv_sec
        || (ts.tv_sec == deadline.tv_sec && ts.tv_nsec >= deadline.tv_nsec);
}

/* QUERY with its first %s replaced by KEY. */
static int build_query(char *out, size_t size, const char *key)
{
    const char *mark = strstr(settings.query, "%s");
    if (mark == NULL)
        return snprintf(out, size, "%s", settings.query);
    return snprintf(out, size, "%.*s%s%s", (int)(mark - settings.query), settings.query,
                    key, mark + 2);
}

static void record(struct worker *w, double began)
{
    if (w->count < w->capacity)
        w->latencies[w->count] = now_us() - began;
    w->count++;
}

static void run_mysql(struct worker *w)
{
    MYSQL *db = mysql_init(NULL);
    if (db == NULL
        || !mysql_real_connect(db, settings.host, settings.user, settings.password,
                               settings.dbname, settings.port, NULL, 0)) {
        w->error = db ? strdup(mysql_error(db)) : "mysql_init failed";
        return;
    }
    char query[MAX_QUERY];
    while (!past_deadline()) {
        int length = build_query(query, sizeof query, keys[rand_r(&w->seed) % key_count]);
        double began = now_us();
        MYSQL_RES *result = NULL;
        if (mysql_real_query(db, query, length) != 0
            || (result = mysql_store_result(db)) == NULL) {
            w->other++;
        } else if (mysql_num_rows(result) > 0) {
            w->ok++;
        } else {
            w->nokey++;
        }
        if (result != NULL)
            mysql_free_result(result);
        record(w, began);
    }
    mysql_close(db);
}

static void run_pgsql(struct worker *w)
{
    char port[16];
    snprintf(port, sizeof port, "%d", settings.port);
    const char *names[] = {"host", "port", "user", "password", "dbname", NULL};
    const char *values[] = {settings.host, port, settings.user, settings.password,
                            settings.dbname, NULL};
    PGconn *db = PQconnectdbParams(names, values, 0);
    if (PQstatus(db) != CONNECTION_OK) {
        w->error = strdup(PQerrorMessage(db));
        PQfinish(db);
        return;
    }
    char query[MAX_QUERY];
    while (!past_deadline()) {
        build_query(query, sizeof query, keys[rand_r(&w->seed) % key_count]);
        double began = now_us();
        PGresult *result = PQexec(db, query);
        if (PQresultStatus(result) != PGRES_TUPLES_OK)
            w->other++;
        else if (PQntuples(result) > 0)
            w->ok++;
        else
            w->nokey++;
        PQclear(result);
        record(w, began);
    }
    PQfinish(db);
}

static void *run(void *arg)
{
    struct worker *w = arg;
    if (settings.mysql) {
        mysql_thread_init();
        run_mysql(w);
        mysql_thread_end();
    } else {
        run_pgsql(w);
    }
    return NULL;
}

static int read_keys(const char *path)
{
    FILE *file = fopen(path, "r");
    if (file == NULL)
        return -1;
    char line[1024];
    while (key_count < MAX_KEYS && fgets(line, sizeof line, file)) {
        line[strcspn(line, "\r\n")] = 0;
        if (*line)
            keys[key_count++] = strdup(line);
    }
    fclose(file);
    return key_count > 0 ? 0 : -1;
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    if (argc != 11) {
        fprintf(stderr, "usage: dbdirect mysql|pgsql HOST PORT USER PASSWORD DBNAME "
                        "QUERY KEYFILE CONNS SECONDS\n");
        return 2;
    }
    settings.mysql = strcmp(argv[1], "mysql") == 0;
    settings.host = argv[2];
    settings.port = atoi(argv[3]);
    settings.user = argv[4];
    settings.password = argv[5];
    settings.dbname = argv[6];
    settings.query = argv[7];
    int conns = atoi(argv[9]);
    settings.seconds = atof(argv[10]);
    if (read_keys(argv[8]) != 0 || conns <= 0 || settings.seconds <= 0) {
        fprintf(stderr, "dbdirect: bad key file %s or arguments\n", argv[8]);
        return 2;
    }
    if (settings.mysql && mysql_library_init(0, NULL, NULL) != 0) {
        fprintf(stderr, "dbdirect: mysql_library_init failed\n");
        return 1;
    }
    struct worker *workers = calloc(conns, sizeof *workers);
    size_t capacity = MAX_SAMPLES / conns;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    double began = now_us();
    deadline.tv_sec += (time_t)settings.seconds;
    deadline.tv_nsec += (long)((settings.seconds - (time_t)settings.seconds) * 1e9);
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    for (int i = 0; i < conns; i++) {
        workers[i].seed = 12345u + i;
        workers[i].capacity = capacity;
        workers[i].latencies = malloc(capacity * sizeof(double));
        pthread_create(&workers[i].thread, NULL, run, &workers[i]);
    }
    size_t total = 0, kept = 0;
    long ok = 0, nokey = 0, other = 0;
    for (int i = 0; i < conns; i++) {
        pthread_join(workers[i].thread, NULL);
        if (workers[i].error) {
            fprintf(stderr, "dbdirect: connect: %s\n", workers[i].error);
            return 1;
        }
        total += workers[i].count;
        ok += workers[i].ok;
        nokey += workers[i].nokey;
        other += workers[i].other;
    }
    double elapsed = (now_us() - began) / 1e6;
    double *all = malloc((total ? total : 1) * sizeof(double));
    for (int i = 0; i < conns; i++) {
        size_t n = workers[i].count < capacity ? workers[i].count : capacity;
        memcpy(all + kept, workers[i].latencies, n * sizeof(double));
        kept += n;
    }
    qsort(all, kept, sizeof(double), by_value);
    printf("conns=%d requests=%zu ok=%ld nokey=%ld other=%ld rps=%.0f p50_us=%.1f "
           "p99_us=%.1f max_us=%.1f\n",
           conns, total, ok, nokey, other, total / elapsed, kept ? all[kept / 2] : 0.0,
           kept ? all[(size_t)(kept * 0.99)] : 0.0, kept ? all[kept - 1] : 0.0);
    if (settings.mysql)
        mysql_library_end();
    return 0;
}
