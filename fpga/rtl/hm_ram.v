// hm_ram: a simple dual-port RAM with one write port and one synchronous read port in the
// same clock: `rdata` is word `raddr` one cycle after the address, and a read of the word
// being written in that cycle returns the new data (write-through), so a read-modify-write
// pipeline needs no forwarding of its own. ULTRA = 1 asks for UltraRAM (URAM288: 4096 x 72),
// otherwise block RAM (RAMB36); both map a synchronous read port, never LUTs.
`default_nettype none

module hm_ram #(
    parameter DEPTH = 1024,
    parameter WIDTH = 64,
    parameter AW    = 10,  // $clog2(DEPTH)
    parameter ULTRA = 0
) (
    input wire clk,

    input wire             we,
    input wire [   AW-1:0] waddr,
    input wire [WIDTH-1:0] wdata,

    input  wire [   AW-1:0] raddr,
    output reg  [WIDTH-1:0] rdata
);
    generate
        if (ULTRA) begin : g_uram
            (* ram_style = "ultra" *) reg [WIDTH-1:0] mem[0:DEPTH-1];
            always @(posedge clk) begin
                if (we) mem[waddr] <= wdata;
                rdata <= (we && waddr == raddr) ? wdata : mem[raddr];
            end
        end else begin : g_bram
            (* ram_style = "block" *) reg [WIDTH-1:0] mem[0:DEPTH-1];
            always @(posedge clk) begin
                if (we) mem[waddr] <= wdata;
                rdata <= (we && waddr == raddr) ? wdata : mem[raddr];
            end
        end
    endgenerate
endmodule

`default_nettype wire
