// A Go HTTPS peer for keytap's lab tests: a server that answers /bytes/N with N bytes, or a
// client that fetches URLs; both log their own secrets through KeyLogWriter (what keytap's
// key log must equal).
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"log"
	"net/http"
	"os"
	"strconv"
	"strings"
)

func tlsConfig(keylog, version, suite string) *tls.Config {
	config := &tls.Config{InsecureSkipVerify: true}
	if keylog != "" {
		file, err := os.OpenFile(keylog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			log.Fatal(err)
		}
		config.KeyLogWriter = file
	}
	switch version {
	case "1.2":
		config.MinVersion, config.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
	case "1.3":
		config.MinVersion, config.MaxVersion = tls.VersionTLS13, tls.VersionTLS13
	}
	if suite != "" {
		for _, s := range append(tls.CipherSuites(), tls.InsecureCipherSuites()...) {
			if s.Name == suite {
				config.CipherSuites = []uint16{s.ID}
			}
		}
		if config.CipherSuites == nil {
			log.Fatalf("no cipher suite %s", suite)
		}
	}
	return config
}

func main() {
	mode := flag.String("mode", "server", "server or client")
	listen := flag.String("listen", "", "server: address to listen on")
	cert := flag.String("cert", "", "server: certificate (PEM)")
	key := flag.String("key", "", "server: private key (PEM)")
	keylog := flag.String("keylog", "", "append NSS key-log lines here")
	version := flag.String("tls", "", "1.2 or 1.3 only (default: both)")
	suite := flag.String("suite", "", "TLS 1.2 cipher suite (Go's name)")
	http1 := flag.Bool("http1", false, "client/server: HTTP/1.1 only (default: HTTP/2 allowed)")
	output := flag.String("o", "", "client: write the bodies here, one after another")
	flag.Parse()
	config := tlsConfig(*keylog, *version, *suite)
	if *mode == "server" {
		handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			size, err := strconv.Atoi(strings.TrimPrefix(r.URL.Path, "/bytes/"))
			if err != nil {
				http.NotFound(w, r)
				return
			}
			w.Header().Set("X-Proto", r.Proto)
			body := make([]byte, size)
			for i := range body {
				body[i] = byte('a' + i%26)
			}
			w.Write(body)
		})
		server := &http.Server{Addr: *listen, Handler: handler, TLSConfig: config}
		if *http1 {
			server.TLSNextProto = map[string]func(*http.Server, *tls.Conn, http.Handler){}
		}
		log.Fatal(server.ListenAndServeTLS(*cert, *key))
	}
	transport := &http.Transport{TLSClientConfig: config, ForceAttemptHTTP2: !*http1,
		DisableKeepAlives: true}
	client := &http.Client{Transport: transport}
	var out io.Writer = ioutil.Discard // io.Discard is Go 1.16+: this builds with 1.15 too
	if *output != "" {
		file, err := os.Create(*output)
		if err != nil {
			log.Fatal(err)
		}
		defer file.Close()
		out = file
	}
	for _, url := range flag.Args() {
		response, err := client.Get(url)
		if err != nil {
			log.Fatal(err)
		}
		if _, err := io.Copy(out, response.Body); err != nil {
			log.Fatal(err)
		}
		response.Body.Close()
		fmt.Fprintln(os.Stderr, url, response.Proto, response.StatusCode)
	}
}
