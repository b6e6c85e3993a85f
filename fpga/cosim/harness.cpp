// hetmem cosim harness: one kernel top level of fpga/rtl (hm_<kernel>), verilated as `Vhm`,
// driven the way the host drives the card. A persistent process: the Python side
// (host/hetmem/fpga/cosim.py) writes requests on stdin and reads replies on stdout; the
// model is reset once at start and then runs call after call, as a card does.
//
// Around the RTL:
//   - HBM: one AXI4 slave per master port (m_axi_mem_a, m_axi_mem_b, m_axi_query, m_axi_out),
//     each over the memory images of the buffers mapped to that port for the call (the
//     memory ports also take writes: the pre-phase's staged beats). A read
//     burst is accepted at once (up to MAX_OUTSTANDING bursts queued), its first beat comes
//     `read_latency` cycles later, then one 512-bit beat per cycle per port. Writes are taken
//     one beat per cycle once their burst's address is in; the response comes `write_latency`
//     cycles after the last beat. A beat outside every mapped buffer answers DECERR (reads
//     return zeros, writes are dropped) and the call reports it.
//   - Control: an AXI4-Lite master writes the argument registers and GIE/IER, then ap_start;
//     the call ends when `interrupt` (ap_done) rises, after which CTRL is read (ap_done must
//     be set) and the interrupt status cleared.
//   - Cycles: clock edges from the edge that accepts the ap_start write to the edge that
//     raises ap_done (the host-visible kernel time).
//
// Protocol (little-endian, no padding):
//   request  u32 magic 'HMRQ', u32 op (1 run, 2 reset, 3 quit)
//   run      u64 max_cycles, f64 wall_limit_s, u32 nregions,
//            nregions x {u32 port (0 a, 1 b, 2 query, 3 out), u32 pad, u64 addr, u64 size,
//                        u64 nbytes, nbytes of initial contents (the rest of size is zero)},
//            u32 nregs, nregs x {u32 offset, u32 value}, u64 out_need (bytes of the out
//            region to return and to check are all written)
//   reply    u32 magic 'HMRS', u32 status (0 done, 1 cycle limit, 2 wall limit, 3 AXI error,
//            4 bad request), u64 cycles, u64 total cycles simulated by this process,
//            u64 out bytes written within out_need, u32 message length, message,
//            then (status 0 or 3) out_need bytes of the out region, u32 count and count x
//            {u32 port (0 a, 1 b), u32 pad, u64 addr, 64 bytes}: every beat written to a
//            memory port (the staged beats, as the memory holds them after the write).
// After status 1 or 2 the model is reset (a host would reset a hung card).

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <string>
#include <unistd.h>
#include <vector>

#include "Vhm.h"
#include "verilated.h"

// Verilator renames the port `interrupt` (a C++ keyword in some compilers' dialects).
#ifndef HM_IRQ
#define HM_IRQ __SYM__interrupt
#endif

namespace {

constexpr uint32_t REQ_MAGIC = 0x51524d48;  // "HMRQ"
constexpr uint32_t REP_MAGIC = 0x53524d48;  // "HMRS"
constexpr uint32_t CTRL = 0x00, GIE = 0x04, IER = 0x08, ISR = 0x0C;
constexpr uint32_t AP_START = 0x1, AP_DONE = 0x2;
constexpr int BEAT = 64;
constexpr size_t MAX_OUTSTANDING = 64;
constexpr uint8_t DECERR = 3;

enum Status : uint32_t { DONE = 0, CYCLE_LIMIT = 1, WALL_LIMIT = 2, AXI_ERROR = 3, BAD = 4 };

int in_fd = 0;
int out_fd = 1;

bool read_exact(void* dst, size_t n) {
    auto* p = static_cast<uint8_t*>(dst);
    while (n > 0) {
        ssize_t got = ::read(in_fd, p, n);
        if (got <= 0) return false;
        p += got;
        n -= static_cast<size_t>(got);
    }
    return true;
}

void write_exact(const void* src, size_t n) {
    const auto* p = static_cast<const uint8_t*>(src);
    while (n > 0) {
        ssize_t put = ::write(out_fd, p, n);
        if (put <= 0) std::exit(3);
        p += put;
        n -= static_cast<size_t>(put);
    }
}

template <typename T>
bool get(T& value) {
    return read_exact(&value, sizeof(T));
}

template <typename T>
void put(const T& value) {
    write_exact(&value, sizeof(T));
}

// One buffer mapped on a port: [addr, addr + size), its bytes.
struct Region {
    uint64_t addr = 0;
    std::vector<uint8_t> bytes;
};

// The buffers of one port; an access outside all of them is a decode error.
struct PortMemory {
    std::vector<Region> regions;
    std::string name;
    uint8_t* find(uint64_t addr) {
        for (auto& r : regions)
            if (addr >= r.addr && addr + BEAT <= r.addr + r.bytes.size())
                return r.bytes.data() + (addr - r.addr);
        return nullptr;
    }
};

struct Fault {
    bool set = false;
    std::string what;
    void note(const std::string& port, const char* kind, uint64_t addr) {
        if (set) return;
        set = true;
        char buf[160];
        std::snprintf(buf, sizeof buf, "%s: %s at 0x%llx decodes to no buffer (DECERR)",
                      port.c_str(), kind, static_cast<unsigned long long>(addr));
        what = buf;
    }
};

// AXI4 read slave: bursts queue with their arrival time; one beat per cycle.
struct ReadSlave {
    struct Burst {
        uint64_t addr;
        uint32_t beats;
        uint64_t ready_at;
    };
    PortMemory mem;
    std::deque<Burst> bursts;
    uint32_t beat = 0;  // beats of the head burst already returned
    uint64_t latency = 32;

    void clear() {
        bursts.clear();
        beat = 0;
    }
    bool arready() const { return bursts.size() < MAX_OUTSTANDING; }
    bool rvalid(uint64_t now) const { return !bursts.empty() && bursts.front().ready_at <= now; }
    // The current beat into rdata (16 words); returns rresp.
    uint8_t fill(uint32_t* rdata, bool& last, Fault& fault) {
        const Burst& b = bursts.front();
        uint64_t addr = b.addr + static_cast<uint64_t>(beat) * BEAT;
        last = beat + 1 == b.beats;
        uint8_t* src = mem.find(addr);
        if (src == nullptr) {
            std::memset(rdata, 0, BEAT);
            fault.note(mem.name, "read", addr);
            return DECERR;
        }
        std::memcpy(rdata, src, BEAT);
        return 0;
    }
    void accept(uint64_t addr, uint32_t len, uint64_t now) {
        bursts.push_back({addr & ~static_cast<uint64_t>(BEAT - 1), len + 1, now + latency});
    }
    void advance() {
        if (++beat == bursts.front().beats) {
            bursts.pop_front();
            beat = 0;
        }
    }
};

// AXI4 write slave: W beats are taken once their burst's address is in. `target`: the
// memory it writes (its own `mem`, or a read port's: the memory ports' staged beats);
// `record`: keep (address, bytes) of every beat written, for the reply.
struct WriteSlave {
    struct Burst {
        uint64_t addr;
        uint32_t beats;
        bool error;
    };
    PortMemory mem;
    PortMemory* target = nullptr;
    bool record = false;
    std::vector<uint64_t> log_addr;
    std::vector<uint8_t> log_data;
    std::deque<Burst> bursts;     // address accepted, data not complete
    std::deque<std::pair<uint64_t, uint8_t>> responses;  // (ready_at, bresp)
    uint32_t beat = 0;
    uint64_t latency = 32;
    uint64_t need_base = 0, need = 0;  // the bytes whose writes are counted
    std::vector<uint8_t> written;      // per byte of the need range: written this call
    uint64_t written_count = 0;

    void clear() {
        bursts.clear();
        responses.clear();
        beat = 0;
        log_addr.clear();
        log_data.clear();
    }
    bool awready() const { return bursts.size() < MAX_OUTSTANDING; }
    bool wready() const { return !bursts.empty(); }
    bool bvalid(uint64_t now) const { return !responses.empty() && responses.front().first <= now; }
    void accept(uint64_t addr, uint32_t len) {
        bursts.push_back({addr & ~static_cast<uint64_t>(BEAT - 1), len + 1, false});
    }
    void take(const uint32_t* wdata, uint64_t strb, bool wlast, uint64_t now, Fault& fault) {
        Burst& b = bursts.front();
        uint64_t addr = b.addr + static_cast<uint64_t>(beat) * BEAT;
        PortMemory& m = target != nullptr ? *target : mem;
        uint8_t* dst = m.find(addr);
        if (dst == nullptr) {
            b.error = true;
            fault.note(m.name, "write", addr);
        } else {
            const auto* src = reinterpret_cast<const uint8_t*>(wdata);
            for (int i = 0; i < BEAT; ++i) {
                if (!((strb >> i) & 1)) continue;
                dst[i] = src[i];
                uint64_t at = addr + i;
                if (at >= need_base && at < need_base + need && !written[at - need_base]) {
                    written[at - need_base] = 1;
                    ++written_count;
                }
            }
            if (record) {
                log_addr.push_back(addr);
                log_data.insert(log_data.end(), dst, dst + BEAT);
            }
        }
        ++beat;
        if (beat == b.beats || wlast) {
            responses.push_back({now + latency, b.error ? DECERR : uint8_t(0)});
            bursts.pop_front();
            beat = 0;
        }
    }
};

// AXI4-Lite master: one register access at a time.
struct LiteMaster {
    bool active = false, is_write = false;
    bool a_done = false, w_done = false;
    uint32_t addr = 0, data = 0, result = 0;
    uint64_t accepted_at = 0;  // edge of the last address/data handshake of a write
    void start_write(uint32_t a, uint32_t d) {
        active = true, is_write = true, a_done = false, w_done = false, addr = a, data = d;
    }
    void start_read(uint32_t a) {
        active = true, is_write = false, a_done = false, addr = a;
    }
};

class Harness {
   public:
    explicit Harness(uint64_t read_latency, uint64_t write_latency) {
        ctx_ = std::make_unique<VerilatedContext>();
        top_ = std::make_unique<Vhm>(ctx_.get());
        a_.mem.name = "m_axi_mem_a";
        b_.mem.name = "m_axi_mem_b";
        q_.mem.name = "m_axi_query";
        out_.mem.name = "m_axi_out";
        for (ReadSlave* s : {&a_, &b_, &q_}) s->latency = read_latency;
        out_.latency = write_latency;
        aw_.target = &a_.mem;  // the pre-phase writes staged beats into the memory ports
        bw_.target = &b_.mem;
        for (WriteSlave* s : {&aw_, &bw_}) s->latency = write_latency, s->record = true;
        reset();
    }
    ~Harness() { top_->final(); }

    void reset() {
        a_.clear(), b_.clear(), q_.clear(), out_.clear(), aw_.clear(), bw_.clear();
        lite_ = LiteMaster{};
        top_->ap_rst_n = 0;
        for (int i = 0; i < 8; ++i) cycle();
        top_->ap_rst_n = 1;
        for (int i = 0; i < 2; ++i) cycle();
        lite_write(GIE, 1);
        lite_write(IER, 1);
    }

    uint64_t total_cycles() const { return now_; }

    void serve_run() {
        uint64_t max_cycles = 0;
        double wall_limit = 0;
        uint32_t nregions = 0;
        if (!get(max_cycles) || !get(wall_limit) || !get(nregions)) std::exit(0);
        for (ReadSlave* s : {&a_, &b_, &q_}) s->mem.regions.clear();
        out_.mem.regions.clear();
        std::string bad;
        for (uint32_t i = 0; i < nregions; ++i) {
            uint32_t port = 0, pad = 0;
            uint64_t addr = 0, size = 0, nbytes = 0;
            if (!get(port) || !get(pad) || !get(addr) || !get(size) || !get(nbytes)) std::exit(0);
            Region r;
            r.addr = addr;
            r.bytes.assign(size, 0);
            if (nbytes > size) std::exit(4);
            if (nbytes && !read_exact(r.bytes.data(), nbytes)) std::exit(0);
            PortMemory* mem = port == 0   ? &a_.mem
                              : port == 1 ? &b_.mem
                              : port == 2 ? &q_.mem
                              : port == 3 ? &out_.mem
                                          : nullptr;
            if (mem == nullptr)
                bad = "unknown port " + std::to_string(port);
            else
                mem->regions.push_back(std::move(r));
        }
        uint32_t nregs = 0;
        if (!get(nregs)) std::exit(0);
        std::vector<std::pair<uint32_t, uint32_t>> regs(nregs);
        for (auto& rv : regs)
            if (!get(rv.first) || !get(rv.second)) std::exit(0);
        uint64_t out_need = 0;
        if (!get(out_need)) std::exit(0);
        if (out_.mem.regions.size() != 1 || out_need > out_.mem.regions[0].bytes.size())
            bad = "expected one out region holding out_need bytes";
        if (!bad.empty()) {
            reply(BAD, 0, 0, bad, nullptr, 0);
            return;
        }
        Region& out = out_.mem.regions[0];
        out_.need_base = out.addr;
        out_.need = out_need;
        out_.written.assign(out_need, 0);
        out_.written_count = 0;
        for (WriteSlave* s : {&aw_, &bw_}) s->log_addr.clear(), s->log_data.clear();
        fault_ = Fault{};

        auto t0 = std::chrono::steady_clock::now();
        for (auto& rv : regs) lite_write(rv.first, rv.second);
        lite_write(CTRL, AP_START);
        uint64_t start = lite_.accepted_at;
        Status status = DONE;
        std::string message;
        while (!top_->HM_IRQ) {
            if (now_ - start >= max_cycles) {
                status = CYCLE_LIMIT;
                break;
            }
            cycle();
            if ((now_ & 0xFFF) == 0 && wall_limit > 0) {
                std::chrono::duration<double> spent = std::chrono::steady_clock::now() - t0;
                if (spent.count() > wall_limit) {
                    status = WALL_LIMIT;
                    break;
                }
            }
        }
        uint64_t cycles = now_ - start;
        if (status != DONE) {
            message = status == CYCLE_LIMIT ? "no ap_done within the cycle limit"
                                            : "no ap_done within the wall-clock limit";
            reply(status, cycles, out_.written_count, message, nullptr, 0);
            reset();
            return;
        }
        uint32_t ctrl = lite_read(CTRL);
        lite_write(ISR, 1);
        if (!(ctrl & AP_DONE)) {
            reply(BAD, cycles, out_.written_count, "interrupt without ap_done in CTRL", nullptr, 0);
            return;
        }
        if (fault_.set) status = AXI_ERROR, message = fault_.what;
        reply(status, cycles, out_.written_count, message, out.bytes.data(), out_need);
        // the beats the memory ports took (staged beats): u32 count, then {u32 port, u32 pad,
        // u64 addr, 64 bytes} each
        uint32_t count = static_cast<uint32_t>(aw_.log_addr.size() + bw_.log_addr.size());
        put(count);
        uint32_t port = 0;
        for (WriteSlave* s : {&aw_, &bw_}) {
            for (size_t i = 0; i < s->log_addr.size(); ++i) {
                put(port);
                put(uint32_t(0));
                put(s->log_addr[i]);
                write_exact(s->log_data.data() + i * BEAT, BEAT);
            }
            ++port;
        }
    }

   private:
    void reply(Status status, uint64_t cycles, uint64_t written, const std::string& message,
               const uint8_t* out, uint64_t nbytes) {
        put(REP_MAGIC);
        put(static_cast<uint32_t>(status));
        put(cycles);
        put(now_);
        put(written);
        put(static_cast<uint32_t>(message.size()));
        write_exact(message.data(), message.size());
        if (out != nullptr && nbytes) write_exact(out, nbytes);
    }

    void lite_write(uint32_t addr, uint32_t data) {
        lite_.start_write(addr, data);
        while (lite_.active) cycle();
    }

    uint32_t lite_read(uint32_t addr) {
        lite_.start_read(addr);
        while (lite_.active) cycle();
        return lite_.result;
    }

    // One clock cycle: drive every slave's and the master's signals, settle, sample the
    // handshakes before the rising edge, clock, then update the models.
    void cycle() {
        Vhm& t = *top_;
        bool a_last = false, b_last = false, q_last = false;
        bool a_rv = a_.rvalid(now_), b_rv = b_.rvalid(now_), q_rv = q_.rvalid(now_);
        t.m_axi_mem_a_arready = a_.arready();
        t.m_axi_mem_a_rvalid = a_rv;
        t.m_axi_mem_a_rresp = a_rv ? a_.fill(t.m_axi_mem_a_rdata.data(), a_last, fault_) : 0;
        t.m_axi_mem_a_rlast = a_last;
        t.m_axi_mem_a_rid = 0;
        t.m_axi_mem_b_arready = b_.arready();
        t.m_axi_mem_b_rvalid = b_rv;
        t.m_axi_mem_b_rresp = b_rv ? b_.fill(t.m_axi_mem_b_rdata.data(), b_last, fault_) : 0;
        t.m_axi_mem_b_rlast = b_last;
        t.m_axi_mem_b_rid = 0;
        t.m_axi_query_arready = q_.arready();
        t.m_axi_query_rvalid = q_rv;
        t.m_axi_query_rresp = q_rv ? q_.fill(t.m_axi_query_rdata.data(), q_last, fault_) : 0;
        t.m_axi_query_rlast = q_last;
        t.m_axi_query_rid = 0;
        bool aw_bv = aw_.bvalid(now_), bw_bv = bw_.bvalid(now_);
        t.m_axi_mem_a_awready = aw_.awready();
        t.m_axi_mem_a_wready = aw_.wready();
        t.m_axi_mem_a_bvalid = aw_bv;
        t.m_axi_mem_a_bresp = aw_bv ? aw_.responses.front().second : 0;
        t.m_axi_mem_a_bid = 0;
        t.m_axi_mem_b_awready = bw_.awready();
        t.m_axi_mem_b_wready = bw_.wready();
        t.m_axi_mem_b_bvalid = bw_bv;
        t.m_axi_mem_b_bresp = bw_bv ? bw_.responses.front().second : 0;
        t.m_axi_mem_b_bid = 0;
        bool o_bv = out_.bvalid(now_);
        t.m_axi_out_awready = out_.awready();
        t.m_axi_out_wready = out_.wready();
        t.m_axi_out_bvalid = o_bv;
        t.m_axi_out_bresp = o_bv ? out_.responses.front().second : 0;
        t.m_axi_out_bid = 0;

        LiteMaster& m = lite_;
        t.s_axi_control_awaddr = m.addr;
        t.s_axi_control_araddr = m.addr;
        t.s_axi_control_wdata = m.data;
        t.s_axi_control_wstrb = 0xF;
        t.s_axi_control_awvalid = m.active && m.is_write && !m.a_done;
        t.s_axi_control_wvalid = m.active && m.is_write && !m.w_done;
        t.s_axi_control_bready = 1;
        t.s_axi_control_arvalid = m.active && !m.is_write && !m.a_done;
        t.s_axi_control_rready = 1;

        t.ap_clk = 0;
        t.eval();

        // handshakes, as the signals stand before the edge
        bool a_ar = t.m_axi_mem_a_arvalid && t.m_axi_mem_a_arready;
        uint64_t a_araddr = t.m_axi_mem_a_araddr;
        uint32_t a_arlen = t.m_axi_mem_a_arlen;
        bool a_r = a_rv && t.m_axi_mem_a_rready;
        bool b_ar = t.m_axi_mem_b_arvalid && t.m_axi_mem_b_arready;
        uint64_t b_araddr = t.m_axi_mem_b_araddr;
        uint32_t b_arlen = t.m_axi_mem_b_arlen;
        bool b_r = b_rv && t.m_axi_mem_b_rready;
        bool q_ar = t.m_axi_query_arvalid && t.m_axi_query_arready;
        uint64_t q_araddr = t.m_axi_query_araddr;
        uint32_t q_arlen = t.m_axi_query_arlen;
        bool q_r = q_rv && t.m_axi_query_rready;
        bool o_aw = t.m_axi_out_awvalid && t.m_axi_out_awready;
        uint64_t o_awaddr = t.m_axi_out_awaddr;
        uint32_t o_awlen = t.m_axi_out_awlen;
        bool o_w = t.m_axi_out_wvalid && t.m_axi_out_wready;
        bool o_b = o_bv && t.m_axi_out_bready;
        if (o_w) {  // the beat must be copied while wdata holds it
            uint64_t strb = t.m_axi_out_wstrb;
            out_.take(t.m_axi_out_wdata.data(), strb, t.m_axi_out_wlast, now_ + 1, fault_);
        }
        bool aw_aw = t.m_axi_mem_a_awvalid && t.m_axi_mem_a_awready;
        uint64_t aw_awaddr = t.m_axi_mem_a_awaddr;
        uint32_t aw_awlen = t.m_axi_mem_a_awlen;
        bool aw_b = aw_bv && t.m_axi_mem_a_bready;
        if (t.m_axi_mem_a_wvalid && t.m_axi_mem_a_wready) {
            uint64_t strb = t.m_axi_mem_a_wstrb;
            aw_.take(t.m_axi_mem_a_wdata.data(), strb, t.m_axi_mem_a_wlast, now_ + 1, fault_);
        }
        bool bw_aw = t.m_axi_mem_b_awvalid && t.m_axi_mem_b_awready;
        uint64_t bw_awaddr = t.m_axi_mem_b_awaddr;
        uint32_t bw_awlen = t.m_axi_mem_b_awlen;
        bool bw_b = bw_bv && t.m_axi_mem_b_bready;
        if (t.m_axi_mem_b_wvalid && t.m_axi_mem_b_wready) {
            uint64_t strb = t.m_axi_mem_b_wstrb;
            bw_.take(t.m_axi_mem_b_wdata.data(), strb, t.m_axi_mem_b_wlast, now_ + 1, fault_);
        }
        bool l_aw = t.s_axi_control_awvalid && t.s_axi_control_awready;
        bool l_w = t.s_axi_control_wvalid && t.s_axi_control_wready;
        bool l_b = m.active && m.is_write && m.a_done && m.w_done && t.s_axi_control_bvalid;
        bool l_ar = t.s_axi_control_arvalid && t.s_axi_control_arready;
        bool l_r = m.active && !m.is_write && m.a_done && t.s_axi_control_rvalid;
        uint32_t l_rdata = t.s_axi_control_rdata;

        t.ap_clk = 1;
        t.eval();
        ++now_;

        if (a_r) a_.advance();
        if (b_r) b_.advance();
        if (q_r) q_.advance();
        if (a_ar) a_.accept(a_araddr, a_arlen, now_);
        if (b_ar) b_.accept(b_araddr, b_arlen, now_);
        if (q_ar) q_.accept(q_araddr, q_arlen, now_);
        if (o_aw) out_.accept(o_awaddr, o_awlen);
        if (o_b) out_.responses.pop_front();
        if (aw_aw) aw_.accept(aw_awaddr, aw_awlen);
        if (aw_b) aw_.responses.pop_front();
        if (bw_aw) bw_.accept(bw_awaddr, bw_awlen);
        if (bw_b) bw_.responses.pop_front();
        if (m.active) {
            if (m.is_write) {
                if (l_aw) m.a_done = true;
                if (l_w) m.w_done = true;
                if ((l_aw || l_w) && m.a_done && m.w_done) m.accepted_at = now_;
                if (l_b) m.active = false;
            } else {
                if (l_ar) m.a_done = true;
                if (l_r) m.active = false, m.result = l_rdata;
            }
        }
    }

    std::unique_ptr<VerilatedContext> ctx_;
    std::unique_ptr<Vhm> top_;
    ReadSlave a_, b_, q_;
    WriteSlave out_;
    WriteSlave aw_, bw_;  // the memory ports' writes (staged beats)
    LiteMaster lite_;
    Fault fault_;
    uint64_t now_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
    // Replies go to a private copy of stdout; anything the model prints goes to stderr.
    out_fd = dup(1);
    dup2(2, 1);
    uint64_t read_latency = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 32;
    uint64_t write_latency = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 32;
    Harness h(read_latency, write_latency);
    for (;;) {
        uint32_t magic = 0, op = 0;
        if (!get(magic) || !get(op)) return 0;
        if (magic != REQ_MAGIC) return 4;
        if (op == 1) {
            h.serve_run();
        } else if (op == 2) {
            h.reset();
            put(REP_MAGIC);
            put(static_cast<uint32_t>(DONE));
            put(uint64_t(0));
            put(h.total_cycles());
            put(uint64_t(0));
            put(uint32_t(0));
        } else {
            return 0;
        }
    }
}
